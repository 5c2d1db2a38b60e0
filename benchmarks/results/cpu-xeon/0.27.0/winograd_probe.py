# Probe (preempt 0.27.0 session): Winograd F(2x2,3x3) for the 3x3 convolutions of ResNet-20 in plain torch,
# against oneDNN direct convolution (channels_last, batch 320 = 16 images x 20 samples), fp32, 2 threads.
# Run: python winograd_probe.py
import torch, time, torch.nn.functional as F
torch.manual_seed(0); torch.set_num_threads(2)
def bench(f, n=10):
    f(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//2]*1e3
G = torch.tensor([[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]])
def wino(x, U):  # x NHWC contiguous, U [4,4,C,K]
    N,H,W,C = x.shape
    xp = F.pad(x, (0,0,1,1,1,1))
    d = xp.unfold(1,4,2).unfold(2,4,2)  # N,th,tw,C,4,4
    # input transform rows then cols (Bt d B)
    r = torch.stack([d[...,0,:]-d[...,2,:], d[...,1,:]+d[...,2,:], d[...,2,:]-d[...,1,:], d[...,1,:]-d[...,3,:]], -2)
    v = torch.stack([r[...,0]-r[...,2], r[...,1]+r[...,2], r[...,2]-r[...,1], r[...,1]-r[...,3]], -1)  # N,th,tw,C,4,4
    T = N*(H//2)*(W//2)
    v = v.reshape(T, C, 16).permute(2,0,1)  # 16,T,C
    m = torch.bmm(v, U.reshape(16, C, -1))  # 16,T,K
    K = m.shape[-1]
    m = m.reshape(4,4,T,K)
    # At = [[1,1,1,0],[0,1,-1,-1]]
    a = torch.stack([m[0]+m[1]+m[2], m[1]-m[2]-m[3]], 0)   # 2,4,T,K
    o = torch.stack([a[:,0]+a[:,1]+a[:,2], a[:,1]-a[:,2]-a[:,3]], 1)  # 2(i),2(j),T,K
    o = o.reshape(2,2,N,H//2,W//2,K).permute(2,3,0,4,1,5).reshape(N,H,W,K)
    return o
for (C,K,S,B) in [(16,16,32,320),(32,32,16,320),(64,64,8,320)]:
    x = torch.randn(B,C,S,S).to(memory_format=torch.channels_last)
    w = torch.randn(K,C,3,3)*0.1
    U = torch.einsum('ai,kcij,bj->abck', G, w, G).contiguous()
    ref = F.conv2d(x, w, padding=1)
    xn = x.permute(0,2,3,1).contiguous()
    out = wino(xn, U)
    err = (out.permute(0,3,1,2)-ref).abs().max().item()
    t1 = bench(lambda: F.conv2d(x, w, padding=1)); t2 = bench(lambda: wino(xn, U))
    print(C,K,S,B, 'direct %.2f ms  winograd(torch) %.2f ms  maxerr %.2e' % (t1,t2,err))
print('bmm alone:')
for (C,K,S,B) in [(16,16,32,320),(32,32,16,320),(64,64,8,320)]:
    T = B*(S//2)**2
    v = torch.randn(16,T,C); U = torch.randn(16,C,K)
    x = torch.randn(B,C,S,S).to(memory_format=torch.channels_last); w = torch.randn(K,C,3,3)
    direct, product = bench(lambda: F.conv2d(x, w, padding=1)), bench(lambda: torch.bmm(v, U))
    print(C, K, S, 'direct %.2f  bmm-only %.2f ms' % (direct, product))
