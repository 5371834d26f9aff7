"""Cola generation against the reference's traced runs (spec §6, fixtures generate_fp32), and its equivalences.

The reference's ways of running (two CFG passes, per-call DiT work, no KV cache) come from
benchmarks/cola_reference.py; the library runs only its own.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Callable
from typing import Any

import cola_reference
import pytest
import torch
from cola_reference import CfgBatching, History, Planning
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import Tensor

from cdlm.errors import DataError
from cdlm.interfaces import GenerateOutput, GenerateRequest
from cdlm.sampling.types import StepCallback, StepInfo
from cdlm_cola.config import ColaConfig, ColaDitConfig, ColaSampleConfig, ColaVaeConfig
from cdlm_cola.dit import ColaDiT
from cdlm_cola.generate import ColaPipeline, noise_key
from cdlm_cola.state_dict import load_pretrained_dit, load_pretrained_vae
from cdlm_cola.vae import ColaTextVAE
from conftest import shared_path
from parity import pin_reference_sinusoid

GREEDY = {"temperature": 0.0, "guidance": 7.0, "steps": 16, "max_new_tokens": 16}
RUNS: dict[str, tuple[int | None, dict[str, Any]]] = {  # run → (per-sample noise seed, sample settings)
    "greedy_cfg7_perSampleSeed66": (66, GREEDY),
    "greedy_cfg7_globalSeed0": (None, GREEDY),
    "sampled_t0.8_k50_p0.9_rep1.1": (None, {"temperature": 0.8, "guidance": 3.0, "steps": 8, "max_new_tokens": 12}),
}
LATENT_ATOL = 1e-4  # free-running: 16 Euler steps × blocks accumulate (fixture README)


@pytest.fixture(scope="module")
def fx() -> dict[str, Tensor]:
    return load_file(shared_path("fixtures", "cola", "generate_fp32.safetensors"))


@pytest.fixture(scope="module")
def meta() -> dict[str, Any]:
    return json.loads(shared_path("fixtures", "cola", "generate_fp32.json").read_text())


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(shared_path("fixtures", "cola", "tokenizer.json")))


@pytest.fixture(scope="module")
def nets() -> tuple[ColaTextVAE, ColaDiT]:
    return (
        load_pretrained_vae(shared_path("fixtures", "cola", "cola_vae")),
        load_pretrained_dit(shared_path("fixtures", "cola", "cola_dit")),
    )


@pytest.fixture(autouse=True)
def _reference_time_embedding(monkeypatch: pytest.MonkeyPatch) -> None:
    pin_reference_sinusoid(monkeypatch)  # the DiT embeds t ≤ 1000 as the fixture machine did, on any CPU (parity.py)


@pytest.fixture(scope="module")
def prompts(meta: dict[str, Any], tokenizer: Tokenizer) -> list[list[int]]:
    ids = [tokenizer.encode(p["question"]).ids for p in meta["meta/prompts"]]
    assert ids == meta["meta/prompt_token_ids"]  # token counts 2, 28, 22
    return ids


def pipeline(
    nets: tuple[ColaTextVAE, ColaDiT],
    seed: int | None = None,
    cfg_batching: CfgBatching = "batched",
    history: History = "kv_cache",
    eos_id: int = 0,
    im_end_id: int | None = 2,
    planning: Planning = "per_block",
) -> ColaPipeline:
    cfg = ColaConfig(pad_id=3, eos_id=eos_id, im_end_id=im_end_id, per_sample_noise_seed=seed)
    return cola_reference.pipeline(cfg, *nets, cfg_batching, history, planning)


def settings(**overrides: Any) -> ColaSampleConfig:
    base = {"sampler": "euler", "grid": "uniform", "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1}
    return ColaSampleConfig(**{**base, **overrides})


def generate(
    pipe: ColaPipeline,
    prompts: list[list[int]] | None,
    sample: ColaSampleConfig,
    sample_ids: list[int | str | None] | None = None,
    then: StepCallback | None = None,
) -> tuple[GenerateOutput, list[Tensor]]:
    """Run the pipeline with the global-RNG-equivalent generator; return its output and each block's final z.

    ``then`` is called after every step, once the block's latents are recorded.
    """
    blocks: list[Tensor] = []

    def on_step(info: StepInfo) -> None:
        if info.index == sample.steps - 1:
            blocks.append(info.z)
        if then is not None:
            then(info)

    n = len(prompts) if prompts is not None else sample.num_samples
    out = pipe(GenerateRequest(n, prompts, sample, sample_ids), torch.Generator().manual_seed(0), on_step)
    return out, blocks


def commits(fx: dict[str, Tensor], meta: dict[str, Any], run: str) -> list[Tensor]:
    """The reference's DiT commits at t = 0 after each block: their txt is the block's final latents (B·bs, C)."""
    events = [e for e in meta[f"gen/{run}/events"] if e["kind"] == "dit" and e["update_kv"]]
    return [fx[f"gen/{run}/{e['idx']:05d}_dit/txt"] for e in events[1:]]  # the first is the prefill


@pytest.mark.parametrize(
    ("run", "path"),
    [(run, "fast") for run in RUNS] + [("greedy_cfg7_perSampleSeed66", "reference")],
)
def test_generation_matches_reference(
    run: str,
    path: str,
    nets: Any,
    fx: dict[str, Tensor],
    meta: dict[str, Any],
    tokenizer: Tokenizer,
    prompts: list[list[int]],
) -> None:
    seed, sample = RUNS[run]
    kwargs = meta[f"gen/{run}/kwargs"]
    assert kwargs["guidance_scale"] == sample["guidance"] and kwargs["timestep_num"] == sample["steps"]
    pipe = pipeline(nets, seed) if path == "fast" else pipeline(nets, seed, "two_pass", planning="per_call")
    out, blocks = generate(pipe, prompts, settings(**sample))
    context = fx[f"gen/{run}/context_ids"]  # (B, blocks·bs), prompt tails included
    trim = [2, 0, 2]  # prompts 0 (2 tokens) and 2 (22) re-decode their 2-token tails in the first block
    assert out.ids == [row[n:] for row, n in zip(context.tolist(), trim, strict=True)]
    assert tokenizer.decode_batch(out.ids, skip_special_tokens=False) == [
        r["generate"] for r in meta[f"gen/{run}/results"]
    ]
    expected = commits(fx, meta, run)
    assert len(blocks) == len(expected) == context.shape[1] // 4
    for got, want in zip(blocks, expected, strict=True):
        torch.testing.assert_close(got.flatten(0, 1), want, atol=LATENT_ATOL, rtol=0)
    assert out.nfe == len(blocks) * (sample["steps"] + 1) + len(blocks) - 1  # steps + decode per block, commits


def test_prompt_plan_matches_reference(nets: Any, fx: dict[str, Tensor], prompts: list[list[int]]) -> None:
    plan = pipeline(nets).plan(prompts, max_new_tokens=16)
    run = "gen/greedy_cfg7_perSampleSeed66"
    assert [p.shape[0] for p in plan.prefix] == fx[f"{run}/00001_dit/txt_shape"].flatten().tolist() == [0, 28, 20]
    torch.testing.assert_close(torch.cat(plan.prefix), fx[f"{run}/00001_dit/txt"], atol=1e-5, rtol=0)
    first = fx[f"{run}/00003_dit/txt"].view(3, 4, 8)  # first cond call: pinned positions hold the clean latents
    assert plan.pinned is not None
    assert plan.pinned.tolist() == [[True, True, False, False], [False] * 4, [True, True, False, False]]
    torch.testing.assert_close(plan.clean[plan.pinned], first[plan.pinned], atol=1e-5, rtol=0)
    assert plan.trim == [2, 0, 2] and not plan.one_block  # sample 0 re-decodes "Hi"; sample 2 its 2-token tail


@pytest.mark.parametrize(
    ("cfg_batching", "history", "planning"),
    [
        ("batched", "kv_cache", "per_block"),  # the fast path (the pipeline's default)
        ("batched", "kv_cache", "per_call"),
        ("two_pass", "kv_cache", "per_block"),
        ("batched", "recompute", "per_call"),
    ],
)
def test_batched_cfg_plans_and_kv_cache_change_no_numbers(
    nets: Any, prompts: list[list[int]], cfg_batching: CfgBatching, history: History, planning: Planning
) -> None:
    sample = settings(**GREEDY)
    reference, ref_blocks = generate(pipeline(nets, 66, "two_pass", planning="per_call"), prompts, sample)
    out, blocks = generate(pipeline(nets, 66, cfg_batching, history, planning=planning), prompts, sample)
    assert out.ids == reference.ids
    for got, want in zip(blocks, ref_blocks, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_generation_stops_when_every_row_emitted_eos(
    nets: Any, prompts: list[list[int]], fx: dict[str, Tensor]
) -> None:
    context = fx["gen/greedy_cfg7_perSampleSeed66/context_ids"]
    # 264 is in every row's first block: one block, EOS kept in the output (no truncation)
    out, _ = generate(pipeline(nets, 66, eos_id=264, im_end_id=None), prompts, settings(**GREEDY))
    assert out.ids == [context[0, 2:4].tolist(), context[1, :4].tolist(), context[2, 2:4].tolist()]
    # 112 (as EOS) ends rows 0 and 1 in block 1 but row 2 only in block 2: the batch stops after block 2
    out, _ = generate(pipeline(nets, 66, eos_id=0, im_end_id=112), prompts, settings(**GREEDY))
    assert [len(ids) for ids in out.ids] == [6, 8, 6]


def test_per_sample_noise_is_keyed_by_sample_id(nets: Any, prompts: list[list[int]]) -> None:
    ids: list[int | str | None] = [7, "q-12", 3]  # "q-12" is not a number: keyed by its crc32, as the reference
    together, z = generate(pipeline(nets, 66), prompts, settings(**GREEDY), ids)
    alone, z_alone = generate(pipeline(nets, 66), prompts, settings(**GREEDY, batch_size=1), ids)
    assert alone.ids == together.ids
    flipped, z_flipped = generate(pipeline(nets, 66), prompts[::-1], settings(**GREEDY), ids[::-1])
    assert flipped.ids == together.ids[::-1]
    # same first-block latents wherever the sample sits; another batch shape rounds differently, and 16 Euler
    # steps at CFG 7 grow that to ~2e-6, so compare at the fixture tolerance
    torch.testing.assert_close(z[0][0], z_alone[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(z[0][0], z_flipped[0][2], atol=1e-5, rtol=0)


def test_per_sample_noise_without_ids_falls_back_to_the_row_in_its_batch(nets: Any, prompts: list[list[int]]) -> None:
    # the reference keys a sample without an id by its row in the batch it was generated in (spec §6.1 step 7.1)
    _, z_alone = generate(pipeline(nets, 66), prompts[1:2], settings(**GREEDY))
    _, z_second = generate(pipeline(nets, 66), prompts, settings(**GREEDY), [None, None, None])
    _, z_keyed = generate(pipeline(nets, 66), prompts, settings(**GREEDY), [None, 0, None])
    assert (z_alone[0][0] - z_second[0][1]).abs().max() > 0.1  # row 1 of a batch: key 1, not 0
    torch.testing.assert_close(z_alone[0][0], z_keyed[0][1], atol=1e-5, rtol=0)


def test_noise_key_follows_the_reference() -> None:
    assert [noise_key(5, 9), noise_key("12", 9), noise_key(None, 9)] == [5, 12, 9]
    assert noise_key("q-12", 0) == zlib.crc32(b"q-12")


def test_one_block_rule_and_unconditional_rows(nets: Any, prompts: list[list[int]]) -> None:
    # a 2-token tail leaves 2 free positions in its block; a budget of 1 token forces exactly that block
    out, blocks = generate(pipeline(nets, 66), prompts, settings(**{**GREEDY, "max_new_tokens": 1}))
    assert len(blocks) == 1 and [len(ids) for ids in out.ids] == [2, 4, 2]
    out, blocks = generate(pipeline(nets, 66), None, settings(**{**GREEDY, "num_samples": 2, "max_new_tokens": 8}))
    assert len(blocks) == 2 and [len(ids) for ids in out.ids] == [8, 8]


@pytest.mark.parametrize(
    ("prompts", "overrides", "match"),
    [
        ([], {}, "prompt list is empty"),
        ([[5], [6]], {}, "got 2 prompts for num_samples=3"),
        ([[5], [6], [7]], {"ids": [1, 2]}, "got 2 sample ids for num_samples=3"),
        ([[5], [320, 7], [1]], {}, r"prompt 1 has token ids \[320\] outside \[0, 320\)"),
    ],
)
def test_invalid_requests_are_data_errors(
    nets: Any, prompts: list[list[int]], overrides: dict[str, Any], match: str
) -> None:
    ids = overrides.pop("ids", None)
    with pytest.raises(DataError, match=match):
        pipeline(nets)(GenerateRequest(3, prompts, settings(**overrides), ids), torch.Generator())


def in_lockstep(*runs: Callable[[StepCallback], Any]) -> tuple[list[Any], int]:
    """Run each ``run(then)`` in its own thread, one at a time, handing over to the next at every solver step.

    Only one run executes at any moment, so the interleaving is exact: run 0 takes a step, then run 1, and so on
    while more than one is unfinished. Returns each run's result and the number of hand-overs.
    """
    turns = [threading.Semaphore(0) for _ in runs]
    done, results, errors, handovers = [False] * len(runs), [None] * len(runs), [], [0]

    def next_turn(me: int) -> None:
        waiting = [j for j in (*range(me + 1, len(runs)), *range(me)) if not done[j]]
        if waiting:
            turns[waiting[0]].release()

    def hand_over(me: int) -> None:
        if any(not done[j] for j in range(len(runs)) if j != me):
            handovers[0] += 1
            next_turn(me)
            turns[me].acquire()

    def work(me: int) -> None:
        turns[me].acquire()
        try:
            results[me] = runs[me](lambda info: hand_over(me))
        except BaseException as err:  # re-raised in the test's thread
            errors.append(err)
        finally:
            done[me] = True
            next_turn(me)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(runs))]
    for thread in threads:
        thread.start()
    turns[0].release()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results, handovers[0]


def test_interleaved_generations_on_one_model_match_sequential_ones(nets: Any, prompts: list[list[int]]) -> None:
    """Generation keeps its KV caches in its own state: two generations stepping in turn on one pipeline (one loaded
    model) give exactly what each gives alone, however their blocks, commits and decodes interleave."""
    pipe = pipeline(nets, 66)
    requests = [
        (prompts, settings(**GREEDY), [7, "q-12", 3]),
        (prompts[:0:-1], settings(**{**GREEDY, "guidance": 3.0, "max_new_tokens": 12, "batch_size": 1}), None),
    ]
    alone = [generate(pipe, p, s, ids) for p, s, ids in requests]
    runs = [lambda then, r=r: generate(pipe, r[0], r[1], r[2], then) for r in requests]
    together, handovers = in_lockstep(*runs)
    assert handovers > 2 * GREEDY["steps"]  # they took turns through many blocks, not one after the other
    for (out, z), (want, want_z) in zip(together, alone, strict=True):
        assert out.ids == want.ids and out.nfe == want.nfe
        assert len(z) == len(want_z) and all(torch.equal(a, b) for a, b in zip(z, want_z, strict=True))


def test_two_tokens_per_latent_layout() -> None:
    gen = torch.Generator().manual_seed(0)
    vae = ColaTextVAE(
        ColaVaeConfig(vocab_size=64, dim=32, ffn_dim=64, encoder_num_blocks=1, decoder_num_blocks=1, num_heads=2,
                      latent_dim=8, patch_size=2, block_size=4),
        gen,
    )  # fmt: skip
    dit = ColaDiT(ColaDitConfig(txt_in_channels=8, txt_out_channels=8, txt_dim=32, emb_dim=32, heads=2, head_dim=16,
                                rope_dim=8, num_layers=1, block_size=4), gen)  # fmt: skip
    pipe = pipeline((vae, dit), 66)
    # 5 tokens → 3 prompt latents of a 4-latent (8-token) block: 3 latents pinned, 5 tokens re-decoded
    plan = pipe.plan([[7] * 5, [9] * 8], max_new_tokens=16)
    assert plan.pinned is not None and plan.pinned.sum(dim=1).tolist() == [3, 0] and plan.trim == [5, 0]
    out, blocks = generate(pipe, [[7] * 5, [9] * 8], settings(**{**GREEDY, "steps": 4}))
    assert len(blocks) == 2 and [len(ids) for ids in out.ids] == [11, 16]  # 2 blocks × 8 tokens, minus the trim
