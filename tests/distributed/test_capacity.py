"""bench/capacity.py: the sizing rules hold for any measured rates (latency within budget, shards
within memory, every image placed), and the script reads the two result CSVs it names."""

from __future__ import annotations

import math

import pytest

from bench.capacity import GIB, ScanRate, main, plan, rate_for


@pytest.mark.parametrize("images", [10**6, 10**8, 10**9, 3 * 10**9])
@pytest.mark.parametrize("bits,single", [(64, 5e9), (256, 5e8)])
def test_plan_respects_latency_memory_and_places_every_image(images, bits, single):
    rates = [ScanRate(bits, 10**6, single / 2, single * 3), ScanRate(bits, 10**7, single, single * 4)]
    p = plan(images, rates, 22.4, target_ms=100, node_mem_gib=24, mem_fraction=0.5,
             meta_bytes_per_image=111, merge_ms=7, qps=100, gpu_per_s=None)
    assert p.shards * p.shard_codes >= images > (p.shards - 1) * p.shard_codes
    assert p.latency_ms <= 100 + 1e-6
    assert p.shard_codes * (bits / 8 + 8) <= 12 * GIB
    assert p.code_bytes == images * (bits / 8 + 8)
    assert math.isclose(p.embed_node_days, images / 22.4 / 86400)
    assert p.copies * p.qps_per_copy >= 100


def test_rate_for_takes_the_largest_measured_size_not_above_the_shard():
    rates = [ScanRate(64, 10**6, 1.0, 1.0), ScanRate(64, 10**7, 2.0, 2.0)]
    assert rate_for(rates, 5 * 10**5).n == 10**6  # below every measurement: the smallest
    assert rate_for(rates, 5 * 10**6).n == 10**6
    assert rate_for(rates, 10**9).n == 10**7


def test_script_prints_the_table_from_the_csvs(tmp_path, capsys):
    ham = tmp_path / "hamming.csv"
    ham.write_text("dataset,n,bits,k,nq,method,qps\n"
                   "random,10000000,64,10,1,ours-flat,500\nrandom,10000000,64,10,1000,ours-flat,2000\n"
                   "random,10000000,256,10,1,ours-flat,50\nrandom,10000000,256,10,1000,ours-flat,500\n")
    models = tmp_path / "cpu_models.csv"
    models.write_text("model,batch,threads,ours_ms\nresnet50,8,2,400\n")
    assert main(["--hamming-csv", str(ham), "--models-csv", str(models)]) == 0
    out = capsys.readouterr().out
    assert "resnet50 batch 8: 20.0 images/s" in out
    assert out.count("\n| 1B |") == 2 and "| 1M | 64 |" in out
    assert main(["--hamming-csv", str(tmp_path / "missing.csv"), "--models-csv", str(models)]) == 1
