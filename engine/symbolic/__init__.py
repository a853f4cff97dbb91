"""Symbolic verification: prove the engine's gradients with sympy.

The engine's eager interpreter runs unchanged on the symbolic backend
(`backends.symbolic`), whose arrays hold sympy expressions. `verify_gradients`
makes a matrix of symbols per input and one for the output's cotangent, runs the
function *and the engine's own backward* on them, differentiates the symbolic
forward with `sympy.diff`, and compares the two element by element (and with a
hand-derived closed form, when one is given). What is proved is the code the engine
runs, not a second hand derivation.

Every comparison is exact (`decide_zero`); the report says, per element, which of
these held:
- "simplified": the difference is 0 as a polynomial or rational function once each
  function application (exp(..), Max(..), Heaviside(..)) and each radical is taken as
  a free unknown. Sound: an identity in free unknowns holds whatever values they
  take. A difference linear in the cotangent is proved one coefficient at a time.
- "rational points": the difference is exactly 0 at 20 random rational points, in
  exact arithmetic: first with the function applications as free unknowns too
  (a Schwartz-Zippel test of the same rational identity), else at points of the
  inputs only, every function evaluated exactly (exponentials of rationals kept as
  exact powers of common bases; nonzero values shown by guaranteed-precision evalf).

The max shift of a stable softmax is proved to cancel (the forward's derivative in
each row max is 0), then held constant, which is what the engine's stop_gradient
does. On a mismatch, each op of the graph has its VJP checked on its own, so the
report names the op and the element that are wrong.

`python -m engine.symbolic --write docs/derivations.md` regenerates the derivations
document from the verified cases (see `case_keys`).

The package has one module per job: `zero` (the zero-decision procedure), `verify`
(the verifier and its reports), `closed_forms` (hand derivations in sympy), `cases`
(the catalogue of verified cases), `nn_cases` (the same proofs on nn modules and
losses, run as training runs them), `chain` (whole-graph proofs by induction
over the graph, every value bound to a symbol, for networks too large for one
sympy.diff) and `document` (the derivations document; it imports nn, so it is not loaded with
the engine: `engine.symbolic.document`).
"""
from .cases import Case, case_keys, case_report, cases, engine_fns
from .verify import (ElementCheck, GradientMismatch, GradientReport, SpecReport, constant,
                     elementwise_engine_check, symbolic_tensor, symbols, verify_elementwise_spec,
                     verify_gradients, verify_leaves)
from .zero import DEFAULT_POINTS, Proof, decide_zero

__all__ = ["verify_gradients", "verify_leaves", "verify_elementwise_spec", "elementwise_engine_check",
           "GradientReport", "SpecReport", "ElementCheck", "GradientMismatch", "decide_zero",
           "Proof", "symbols", "symbolic_tensor", "constant", "case_keys", "case_report",
           "Case", "cases", "engine_fns",
           "DEFAULT_POINTS"]
