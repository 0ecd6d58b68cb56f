"""torch 2.13's FSDP2 crashes (segmentation fault in backward) when a module of a grouped unit
`fully_shard([a, b])` runs twice before backward while its twin ran once; DiffusionGemma's tied encoder/decoder
layers are such a pair (the decoder runs for self-conditioning, then graded). dgtune/sharded.py therefore unties
frozen shared weights and shards each layer alone. Run to see whether a torch version still crashes:

    MODE=sc_gradall python eval/ci/fsdp2_grouped_repro.py   # tied pair, decoder twice: crashes (exit 139) on 2.13
    MODE=sc_untied_gradall python eval/ci/fsdp2_grouped_repro.py   # untied, one unit per layer: ok
"""
import os, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
torch.manual_seed(0)
mode = os.environ.get("MODE", "")
class L(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.l = torch.nn.Linear(8, 8); s.n = torch.nn.Parameter(torch.ones(8))
    def forward(s, x): return s.l(x) * s.n.float()
class M(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.enc = torch.nn.ModuleList([L() for _ in range(2)]); s.dec = torch.nn.ModuleList([L() for _ in range(2)])
        if 'untied' not in mode:
            for e, d in zip(s.enc, s.dec): d.l.weight = e.l.weight; d.n = e.n
        s.head = torch.nn.Linear(8, 8)
    def dec_run(s, x):
        for d in s.dec: x = d(x)
        return x
    def forward(s, x):
        h = x
        for e in s.enc: h = e(h)
        if "sc" in mode:
            with torch.no_grad():
                sc = s.head(s.dec_run(h))
            h = h + sc
        return s.head(s.dec_run(h)).sum()
m = M()
for p in m.parameters(): p.requires_grad_(False)
m.head.weight.requires_grad_(True)
if 'gradall' in mode:
    [p.requires_grad_(True) for p in m.parameters()]
for e in m.enc: e.l.bias.requires_grad_(True)
mesh = init_device_mesh("cpu", (1,))
if 'untied' in mode:
    for x in list(m.enc) + list(m.dec): fully_shard(x, mesh=mesh)
elif 'nounits' not in mode:
    for e, d in zip(m.enc, m.dec): fully_shard([e, d], mesh=mesh)
fully_shard(m, mesh=mesh)
for i in range(2):
    loss = m(torch.randn(4, 8)); loss.backward()
print("ok", mode, torch.__version__)
