import engine as eg


def test_profile_counts_ops_by_phase_and_splits_time():
    x = eg.ones(4, 4)
    w = eg.ones(4, 4, requires_grad=True)
    with eg.profile() as p:
        (eg.tanh(x @ w)).sum().backward()
    rows = {(r["op"], r["phase"]): r for r in p.rows()}
    assert rows[("matmul", "forward")]["calls"] == 1
    assert rows[("matmul", "backward")]["calls"] == 1          # only dW: x needs no grad
    assert ("tanh", "forward") in rows and ("sum", "forward") in rows
    s = p.summary()
    assert s["op_calls"] == sum(r["calls"] for r in p.rows())
    assert 0 <= s["compute_ms"] <= s["ops_ms"] <= s["wall_ms"]
    assert abs(s["forward_ms"] + s["backward_ms"] - s["ops_ms"]) < 1e-9
    assert "dispatch" in p.table() and "matmul" in p.table()
    assert eg.is_grad_enabled()
