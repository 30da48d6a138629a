"""integrity.json (megatron-core 0.19's SHA-256 manifest): inputs verified, output written."""

import json

import ckpt_factory
from helpers import cli
from megatron_pma.checkpoint import integrity


def test_verify_inputs_and_write_manifest(gpt_tp2, tmp_path):
    save = ckpt_factory.copy_run(gpt_tp2, tmp_path / "save")
    for d in save:
        integrity.write(d)
    out = tmp_path / "merged"
    r = cli("merge", *save, "--output", out, "--quiet", "--verify-integrity")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "integrity.json").read_text())
    assert manifest["algorithm"] == "sha256"
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir() if p.name != "integrity.json")
    assert integrity.verify(out)
    # a flipped byte in one input is caught before any output exists
    victim = sorted(save[1].glob("*.distcp"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = cli("merge", *save, "--output", tmp_path / "m2", "--quiet", "--verify-integrity")
    assert r.returncode == 2 and victim.name in r.stderr and "SHA-256" in r.stderr
    assert not (tmp_path / "m2").exists()
