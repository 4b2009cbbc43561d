"""Why the DETR heads' float32 gradients differed between CPU and CUDA in part 1 of `bench.py gpu`
(4 Dec 2026): every loss term's gradients on both devices, the matching and the top-k compared.
Run from the repository root on a CUDA machine: `python results/gpu/grad_diag.py` (writes $OUT or /tmp)."""
import copy, json, os, sys
sys.path.insert(0, os.getcwd())
import torch
import bench, detection
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
rec = {}
orig_match = detection.HungarianMatcher.forward
def match(self, *a, **k):
    out = orig_match(self, *a, **k)
    rec.setdefault("match", []).append([[r.tolist(), c.tolist()] for r, c in out])
    return out
detection.HungarianMatcher.forward = match
orig_topk = torch.topk
def topk(x, k, *a, **kw):
    out = orig_topk(x, k, *a, **kw)
    rec.setdefault("topk", []).append(sorted(out.indices.flatten().tolist()) if out.indices.numel() < 5000 else None)
    return out
torch.topk = topk
report = {}
models = bench._gpu_models(False)
for name in ["rotated DETR (ResNet-18)", "MutDet pre-trainer"]:
    model, inputs, loss_fn = models[name]
    model.train()
    res = {}
    devs = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu", "cpu")
    for i, dev in enumerate(devs):
        m = copy.deepcopy(model).to(dev)
        x = bench._to(inputs, torch.device(dev))
        rec.clear()
        out = m(*x)
        terms = out["losses"] if "losses" in out else out
        recd = copy.deepcopy(rec)
        grads = {}
        for k, v in terms.items():
            m.zero_grad(set_to_none=True)
            v.backward(retain_graph=True)
            grads[k] = {n: p.grad.detach().cpu().double().clone() for n, p in m.named_parameters() if p.grad is not None}
        res[i] = (recd, {k: float(v) for k, v in terms.items()}, grads)
    (rc, lc, gc), (rg, lg, gg) = res[0], res[1]
    r = dict(match_same=rc.get("match") == rg.get("match"), topk_same=rc.get("topk") == rg.get("topk"),
             match_cpu=rc.get("match"), match_cuda=rg.get("match"), terms={})
    for k in lc:
        gk, hk = gc[k], gg[k]
        scale = max([float(g.abs().max()) for g in gk.values()] + [1e-30])
        errs = sorted(((float((hk[n] - g).abs().max()) / scale, n) for n, g in gk.items() if n in hk), reverse=True)[:3]
        r["terms"][k] = dict(loss_cpu=lc[k], loss_cuda=lg[k], grad_rel=errs, one_side=sorted(set(gk) ^ set(hk))[:5])
    report[name] = r
    print(name, "match same:", r["match_same"], "topk same:", r["topk_same"])
    for k, t in r["terms"].items():
        print(f"  {k:<24} {t['loss_cpu']:.7g} {t['loss_cuda']:.7g}  worst grads {[(round(e, 8), n) for e, n in t['grad_rel']][:2]} {t['one_side']}")
json.dump(report, open(os.path.join(os.environ.get("OUT", "/tmp"), "grad_diag.json"), "w"), indent=1)
