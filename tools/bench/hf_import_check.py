"""Imported Hugging Face models on a device: for each supported architecture a tiny random model
(the tests' own, built locally) is imported with tools/convert_checkpoint.py, loaded as a role
model on ``--device`` (Transformer Engine's layer spec where it is installed on a GPU, whose
fused layer-norm names the import maps), and its logits are compared with transformers' on the
same device. Prints one line per architecture and a JSON summary; exits 1 on a mismatch.

    python tools/bench/hf_import_check.py --device cuda --output-dir /tmp/hf_check
"""

# ruff: noqa: E402
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch

from tests.hf_utils import ARCHITECTURES, VOCAB, make_hf_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args()
    from megatron_sip.inference.pipeline import pipeline_forward
    from megatron_sip.initialize import ParallelConfig, initialize_distributed
    from megatron_sip.roles.megatron_backend import RoleModel

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    context = initialize_distributed(ParallelConfig(), args.device, environ={})
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    results, failed = {}, False
    for arch in ARCHITECTURES:
        hf_dir, target = output / f"{arch}_hf", output / f"{arch}_megatron"
        reference_model = make_hf_model(arch, hf_dir).to(args.device)
        subprocess.run(
            [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "import",
             "--hf-model", str(hf_dir), "--output", str(target)],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        role = RoleModel(str(target), ParallelConfig(), context.pg_collection)
        on_device = tokens.to(args.device)
        with torch.no_grad():
            reference = reference_model(on_device).logits.float()
            positions = torch.arange(tokens.shape[1], device=args.device).expand_as(on_device)
            ours = pipeline_forward(role.module, on_device, positions, runtime_gather_output=True)
        difference = (ours[..., :VOCAB].float() - reference).abs().max().item()
        layers = type(role.module.decoder.layers[0].self_attention.linear_qkv).__name__
        results[arch] = {"max_abs_logit_difference": difference, "linear_qkv": layers}
        failed |= not difference < args.tolerance
        print(f"{arch}: max |logit difference| {difference:.3g} ({layers})", flush=True)
    print(json.dumps({"device": args.device, "architectures": results}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
