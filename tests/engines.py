"""The same model in two engines, llama.cpp (llama-cpp-python) and peftkit (transformers), and how to compare
their greedy generations honestly.

llama.cpp runs SmolLM2's Q4_1 weights with its own kernels (8-bit activations); transformers runs the same
weights de-quantised, in fp32. Their logits differ by a small noise, so wherever a model's top two tokens
are closer than that noise, argmax may pick either, and greedy generations may part there and nowhere else.
The check below makes that exact, position by position, with both engines teacher-forced on the same prefix:

* ``noise_ranges``: the noise ε, per position: the spread (max − min) of the engines' logit differences
  over the k tokens ranked highest. Any gap between two of those tokens differs between the engines by at
  most this much, so it is the scale at which argmax can flip.
* ``disagreements``: every position where the two engines' argmax differ, with each engine's top-2 gap,
  whether the two picks are each other's runner-up (a swap of the top 2), and each engine's deficit: how far
  below its own pick it ranks the other engine's pick (for a swap, the deficits are the top-2 gaps).
* ``near_tie_violations``: the disagreements that are NOT near ties: a deficit of at least ε in either engine.
  (A near tie may take three tokens: two engines may pick the first and the third of three tokens within ε.)
  A correct adapter has none; a wrong one (ΔW doubled, or no adapter at all) does.
"""

from __future__ import annotations

import numpy as np
import torch

GREEDY_TOKENS = 16
TOP_K = 5


# ---- running each engine ------------------------------------------------------------------------------
def agreement(a: list[int], b: list[int]) -> int:
    """How many greedy tokens two engines agree on: the length of the common prefix of their continuations,
    or GREEDY_TOKENS when the continuations are identical (both reached the limit, or both stopped at EOS)."""
    if a == b:
        return GREEDY_TOKENS
    return next(i for i, (x, y) in enumerate(zip([*a, None], [*b, None], strict=False)) if x != y)


def llama_cpp_logits(model_path, tokens: list[int], lora_path=None) -> torch.Tensor:
    """llama.cpp's logits (len(tokens), vocab) for every position of ``tokens``, in one batch."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=lora_path and str(lora_path), n_ctx=64,
                          logits_all=True, n_threads=2, verbose=False, seed=0)
    try:
        llm.eval(tokens)
        return torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float64))
    finally:
        llm.close()


def _last_logits(llm) -> np.ndarray:
    """The logits of the last position evaluated (``Llama.scores`` holds them only with logits_all=True;
    without it, it stays zero and argmax would say token 0 every time)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).astype(np.float64)


def llama_cpp_greedy(llm, prompt: list[int], eos: int) -> list[int]:
    """llama.cpp's greedy continuation: the prompt in one batch, then one token at a time."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    while len(out) < GREEDY_TOKENS and (not out or out[-1] != eos):
        out.append(int(np.argmax(_last_logits(llm))))
        llm.eval(out[-1:])
    return out


def llama_cpp_forced(llm, prompt: list[int], path: list[int]) -> np.ndarray:
    """llama.cpp's next-token logits (len(path), vocab) after the prompt and after each token of ``path`` but
    the last, fed exactly as its greedy loop feeds its own tokens (so where ``path`` is llama.cpp's own
    greedy prefix, these are the logits its greedy run decided on)."""
    llm.reset()
    llm.eval(prompt)
    rows = [_last_logits(llm)]
    for token in path[:-1]:
        llm.eval([token])
        rows.append(_last_logits(llm))
    return np.stack(rows)


def peftkit_greedy(model, prompt: list[int], eos: int) -> list[int]:
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS,
                             do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


def peftkit_forced(model, prompt: list[int], path: list[int]) -> np.ndarray:
    """peftkit's next-token logits (len(path), vocab) after the prompt and after each token of ``path`` but the
    last: one forward over prompt + path[:-1] (teacher forcing)."""
    ids = torch.tensor([prompt + path[:-1]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, len(prompt) - 1:]
    return out.double().numpy()


# ---- comparing them -------------------------------------------------------------------------------------
def top2(row: np.ndarray) -> tuple[int, int, float]:
    """(best token, runner-up, best − runner-up logit)."""
    second, first = np.argpartition(row, -2)[-2:]
    if row[second] > row[first]:
        first, second = second, first
    return int(first), int(second), float(row[first] - row[second])


def noise_ranges(ours: np.ndarray, theirs: np.ndarray, ranked_by: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Per position, max − min of (theirs − ours) over the k tokens ``ranked_by`` ranks highest: how much the
    two engines can disagree on the gap between any two of those tokens."""
    out = np.empty(len(ours))
    for p in range(len(ours)):
        tokens = np.argpartition(ranked_by[p], -k)[-k:]
        delta = theirs[p, tokens] - ours[p, tokens]
        out[p] = delta.max() - delta.min()
    return out


def disagreements(ours: np.ndarray, theirs: np.ndarray) -> list[dict]:
    """Every position where the engines' argmax differ (both teacher-forced on the same prefix)."""
    rows = []
    for p in range(len(ours)):
        o1, o2, o_gap = top2(ours[p])
        t1, t2, t_gap = top2(theirs[p])
        if o1 != t1:
            rows.append({"position": p, "ours": o1, "theirs": t1, "ours_gap": o_gap, "theirs_gap": t_gap,
                         "swap": o2 == t1 and t2 == o1, "ours_deficit": float(ours[p, o1] - ours[p, t1]),
                         "theirs_deficit": float(theirs[p, t1] - theirs[p, o1]),
                         "pair_noise": float((theirs[p, t1] - ours[p, t1]) - (theirs[p, o1] - ours[p, o1]))})
    return rows


def near_tie_violations(ours: np.ndarray, theirs: np.ndarray, epsilon: float) -> list[dict]:
    """The disagreements that are not near ties: either engine ranks the other's pick ``epsilon`` or more
    below its own."""
    return [d for d in disagreements(ours, theirs) if not (d["ours_deficit"] < epsilon and d["theirs_deficit"] < epsilon)]
