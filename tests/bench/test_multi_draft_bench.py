"""`falconet bench multi-draft`'s table: no verifier above its optimum, k = 1 exactly the
single-draft acceptance, and drawing without replacement at least as good as i.i.d."""

import torch

from falconet.bench.multi_draft import acceptance_table


def test_acceptance_table_orders_verifiers_and_optima():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(2 * torch.randn(20, 30, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(2 * torch.randn(20, 30, generator=g, dtype=torch.float64), -1)
    table = acceptance_table(p, q, ks=(1, 2, 3), trials=300)
    single = float(torch.minimum(p, q).sum(-1).mean())
    assert abs(table[1]["spectr"] - single) < 1e-9 and abs(table[1]["optimal_iid"] - single) < 1e-9
    assert abs(table[1]["rsd"] - single) < 0.03  # Monte Carlo: 6000 trials in all
    for k in (2, 3):
        row = table[k]
        assert single < row["spectr"] <= row["optimal_iid"] + 1e-9
        assert row["rsd"] > table[k - 1]["rsd"]
    assert table[2]["rsd"] <= table[2]["optimal_without"] + 0.03
    assert table[2]["optimal_without"] >= table[2]["optimal_iid"] - 1e-9
    assert table[3]["optimal_without"] != table[3]["optimal_without"]  # not computed for k = 3 (NaN)
