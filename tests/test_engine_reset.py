"""reset_prefix_cache (what the benchmarks call between workloads, as vLLM's): cached prefixes
and parked conversations are forgotten, running requests keep their KV, the pool stays whole."""

from __future__ import annotations

import pytest
from engine_utils import engine_env, greedy  # noqa: F401

from vtensor.engine import LLMEngine

pytestmark = pytest.mark.usefixtures("engine_env")
PROMPT = list(range(100, 180))  # 80 tokens: several pages / blocks


def _run(eng: LLMEngine, rid: str, ids: list[int], n: int = 4, done: dict | None = None):
    eng.add_request(rid, ids, greedy(n))
    done = {} if done is None else done
    while eng.has_unfinished_requests():
        done.update((o.request_id, o) for o in eng.step() if o.finished)
    return done[rid]


@pytest.mark.parametrize("kv", ["virtual", "paged"])
def test_reset_prefix_cache_forgets_prefixes_but_not_running_requests(kv):
    eng = LLMEngine(model="smollm2-135m", load_format="dummy", device="cpu", dtype="float32",
                    max_model_len=256, kv=kv, page_size=2**16, debug=True,
                    config_overrides={"num_layers": 2})  # fmt: skip
    other = list(range(500, 540))  # shares nothing with PROMPT
    alone = _run(eng, "alone", other, 30)
    eng.reset_prefix_cache()
    first = _run(eng, "a", PROMPT)
    assert _run(eng, "b", PROMPT).num_cached_tokens >= 64  # cached (or parked) prefix
    eng.add_request("running", other, greedy(30))
    for _ in range(3):
        eng.step()
    assert eng.reset_prefix_cache(trim=True) > 0
    eng.kv_cache.check_integrity()
    done: dict = {}
    again = _run(eng, "c", PROMPT, done=done)
    assert done["running"].outputs[0].token_ids == alone.outputs[0].token_ids
    assert again.num_cached_tokens == 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    eng.kv_cache.check_integrity()
    eng.close()
