"""A few training steps of a language model, eager or under eg.jit, for tests that
compare the two."""
import engine as eg
from engine import nn


def train_steps(model, opt, inp, tgt, use_jit: bool, n: int = 3):
    """(the losses of `n` steps, the step function run: the jitted one under jit)."""
    def step(inp, tgt):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(inp), tgt)
        loss.backward()
        opt.step()
        return loss
    run = eg.jit(step) if use_jit else step
    return [run(inp, tgt).item() for _ in range(n)], run
