"""Worker for benchmarks/vs_pytorch.py: times the ORIGINAL PyTorch code, loaded from local copies.

Run by vs_pytorch.py with the Python given by ``--ref-python`` (the original reward model needs
transformers 4.x: ``ViTModel(...).encoder``). Nothing from the original repositories is copied
into this project: the sources are imported from the folders given on the command line.

Protocol (one JSON object per line): the driver sends ``{"case": NAME}``; the worker runs that
case once and answers ``{"wall": s, "cpu": s}``. ``{"case": "quit"}`` ends it. Cases are built
once at start-up from the JSON config in argv[1].
"""

from __future__ import annotations

import json
import sys
import time


def _build(cfg):
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"])
    b = cfg["batch"]
    cases = {}
    if cfg.get("dcevo_src"):
        sys.path.insert(0, cfg["dcevo_src"])
        from sleepnet import DE_Decoder, DE_Encoder, HighFreqExtractor, LowFreqExtractor

        enc, dec = DE_Encoder(), DE_Decoder()
        lfe, hfe = LowFreqExtractor(dim=64), HighFreqExtractor(num_layers=3)
        modules = [enc, dec, lfe, hfe]
        s = cfg["dcevo_size"]
        ir, vi = torch.rand(b, 1, s, s), torch.rand(b, 1, s, s)

        def fuse():  # the reference's test_Fusion.py forward
            ib, idt, _ = enc(ir)
            vb, vd, _ = enc(vi)
            out, _ = dec(vi * 0.5 + ir * 0.5, lfe(ib + vb), hfe(idt + vd))
            return out

        def dcevo_fwd():
            with torch.no_grad():
                fuse()

        def dcevo_fwd_bwd():
            for m in modules:
                m.zero_grad(set_to_none=True)
            fuse().mean().backward()

        cases["dcevo_fwd"], cases["dcevo_fwd_bwd"] = dcevo_fwd, dcevo_fwd_bwd
    if cfg.get("rahf_src"):
        import transformers

        sys.path.insert(0, cfg["rahf_src"])
        v = cfg["vit"]
        vit_cfg = transformers.ViTConfig(
            hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
            num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
            image_size=v["image_size"], patch_size=v["patch_size"])
        # Random weights at the given geometry instead of a hub download.
        transformers.ViTModel.from_pretrained = classmethod(lambda cls, *a, **k: cls(vit_cfg))
        from reward_model.model import RAHF

        model = RAHF(patch_size=v["patch_size"], image_size=v["image_size"]).eval()
        x = torch.rand(b, 3, v["image_size"], v["image_size"]) * 2 - 1

        def reward_fwd():
            with torch.no_grad():
                model(x, x, x)

        cases["reward_fwd"] = reward_fwd
    return cases


def main():
    cfg = json.loads(sys.argv[1])
    cases = _build(cfg)
    print(json.dumps({"ready": sorted(cases)}), flush=True)
    for line in sys.stdin:
        name = json.loads(line)["case"]
        if name == "quit":
            break
        t, c = time.perf_counter(), time.process_time()
        cases[name]()
        print(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c}),
              flush=True)


if __name__ == "__main__":
    main()
