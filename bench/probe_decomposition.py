"""Where does the entropy law stop describing a real network's step? The SGD entropy probe, re-run offline
from a study's saved checkpoints, with the first-order terms that split the gap into its causes.

For every run directory given and every checkpoint step asked for (0 = the run's warm start), it loads the
policy (the warm start with the DeepSpeed checkpoint's module weights on top), samples on-policy batches
like the run's own (its prompts, group size, temperature and advantage estimator; sampled with HF
``generate``, scored by the task's verifier), and runs ``pipeline.core.entropy_probe.sgd_entropy_probe``,
which measures the exact entropy change of one plain SGD step per lr beside:
    the network's first-order term, the lookup-table (tabular softmax) first-order term, and the batch
    covariances of the paper.
The chain measured -> network first order -> lookup-table -> covariance is summarised link by link
(``pipeline.analysis.probe_analysis.decomposition_summary``) into OUT/probe_decomposition.md, with the probe
rows in OUT/probe_rows.jsonl and a figure OUT/probe_decomposition.png. Finished (run, step, batch) points are
kept, so a cut-off run resumes.

    .venv/bin/python bench/probe_decomposition.py ../study-runs/*-seed* --steps 0 100 200 \\
        --out docs/results/countdown/probe_decomposition
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

from pipeline.analysis.probe_analysis import (  # noqa: E402
    FORMS,
    LINEAR,
    TABULAR,
    decomposition_summary,
    render_decomposition_table,
)
from pipeline.core.advantages import advantages_from_config  # noqa: E402
from pipeline.core.entropy_probe import lr_key, sgd_entropy_probe  # noqa: E402
from pipeline.data.tasks import make_rows, task_spec  # noqa: E402
from pipeline.data.tiny_model import ensure_tiny_model  # noqa: E402
from pipeline.driver.config_io import load_config  # noqa: E402
from schemas.batches import Ragged, TrainBatch  # noqa: E402


def load_policy(run_dir: Path, step: int, cfg) -> tuple[LlamaForCausalLM, object]:
    """The run's warm start, with checkpoint ``step``'s weights loaded when ``step`` > 0."""
    base = ensure_tiny_model(cfg.model.tiny, cfg.data.synthetic, progress=True)
    model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    if step:
        states = (
            run_dir / "checkpoints" / f"step_{step:06d}" / "learner" / "ckpt" / "mp_rank_00_model_states.pt"
        )
        if not states.is_file():
            raise SystemExit(f"[probe] {run_dir.name}: no checkpoint of step {step} ({states} missing)")
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
        missing, unexpected = model.load_state_dict(module, strict=False)
        # tied embeddings: the checkpoint may hold lm_head under the embedding's name only
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise SystemExit(f"[probe] {states}: weights do not fit the warm start ({missing}, {unexpected})")
    model.eval()
    return model, AutoTokenizer.from_pretrained(base)


@torch.no_grad()
def sample_batch(model, tokenizer, cfg, rows: list[dict], seed: int) -> TrainBatch:
    """One on-policy batch like the run's: ``prompts_per_step`` prompts x ``group_size`` samples, scored and
    given the run's advantages."""
    sched, gen = cfg.schedule, cfg.generator
    rng = np.random.default_rng(seed)
    picked = [rows[i] for i in rng.choice(len(rows), sched.prompts_per_step, replace=False)]
    score = task_spec(cfg.data.synthetic).score_response
    tokenizer.padding_side = "left"
    enc = tokenizer([r["prompt"] for r in picked], return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=enc["input_ids"].repeat_interleave(sched.group_size, 0),
        attention_mask=enc["attention_mask"].repeat_interleave(sched.group_size, 0),
        do_sample=True,
        temperature=gen.temperature,
        top_k=0,
        top_p=gen.top_p,
        max_new_tokens=gen.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    width = enc["input_ids"].shape[1]
    seqs, p_len, rewards = [], [], []
    for i, row in enumerate(out.tolist()):
        prompt = [t for t, m in zip(row[:width], enc["attention_mask"][i // sched.group_size]) if m]
        resp = row[width:]
        if tokenizer.eos_token_id in resp:  # keep the EOS, drop the padding after it
            resp = resp[: resp.index(tokenizer.eos_token_id) + 1]
        resp = resp or [tokenizer.eos_token_id]
        text = tokenizer.decode(resp, skip_special_tokens=True)
        rewards.append(score(text, picked[i // sched.group_size]["ground_truth"])[0])
        seqs.append(prompt + resp)
        p_len.append(len(prompt))
    index = np.repeat(np.arange(len(picked)), sched.group_size)
    adv = advantages_from_config(cfg.algorithm.advantage, torch.tensor(rewards), torch.from_numpy(index))
    n_resp = sum(len(s) - p for s, p in zip(seqs, p_len, strict=True))
    return TrainBatch(
        step=0,
        policy_version=0,
        sequences=Ragged.from_lists(seqs),
        prompt_lengths=np.asarray(p_len, np.int32),
        advantages=adv.numpy().astype(np.float32),
        sampler_logprobs=np.zeros(n_resp, np.float32),
        prompt_index=index.astype(np.int64),
    ), float(np.mean(rewards))


def plot(rows: list[dict], lrs: list[float], path: Path) -> None:
    """Three panels, one per link: measured dH/lr (smallest lr) vs the network's first-order term (same
    units: y = x is the law of that link), the network's term vs the lookup-table term, the lookup-table
    term vs the batch covariance (their scales differ by orders of magnitude: each panel has its own axes
    and the least-squares line through 0; r in the title)."""
    from matplotlib.figure import Figure

    from pipeline.analysis.runs import pearson

    fig = Figure(figsize=(13.5, 4.4), dpi=120)
    axes = fig.subplots(1, 3)
    lr = min(lrs)
    arms = sorted({r["arm"] for r in rows})
    panels = (
        (LINEAR, lambda r: r[lr_key(lr)] / lr, "network first order", f"measured dH / lr (lr {lr:g})"),
        (TABULAR, lambda r: r[LINEAR], "lookup-table first order", "network first order"),
        (FORMS["token"], lambda r: r[TABULAR], "−Cov(log π, A), batch", "lookup-table first order"),
    )
    for n, (ax, (kx, fy, xl, yl)) in enumerate(zip(axes, panels, strict=True)):
        sign = -1.0 if kx.startswith("probe/cov") else 1.0
        xs, ys = [], []
        for i, arm in enumerate(arms):
            pts = [r for r in rows if r["arm"] == arm]
            x, y = np.array([sign * r[kx] for r in pts]), np.array([fy(r) for r in pts])
            ax.scatter(x, y, s=10, alpha=0.7, color=f"C{i}", label=arm)
            xs.append(x)
            ys.append(y)
        x, y = np.concatenate(xs), np.concatenate(ys)
        k = float(x @ y / (x @ x))
        grid = np.linspace(x.min(), x.max(), 2)
        ax.plot(grid, k * grid, color="k", lw=1.0, label="least squares through 0")
        if n == 0:
            ax.plot(grid, grid, color="0.5", lw=0.8, ls="--", label="y = x")
        ax.set_title(f"r = {pearson(x, y):.2f}", fontsize="medium")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(
        "Entropy change of one SGD step per unit lr: from the measurement to the law, one link at a time"
    )
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (with config.yaml and checkpoints/)")
    ap.add_argument(
        "--steps", type=int, nargs="+", default=[0, 200], help="checkpoint steps (0 = warm start)"
    )
    ap.add_argument("--batches", type=int, default=3, help="on-policy batches probed per checkpoint")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "probe_rows.jsonl"
    rows = [json.loads(x) for x in store.read_text().splitlines()] if store.is_file() else []
    done = {(r["run"], r["step"], r["batch"]) for r in rows}
    t0 = time.perf_counter()
    todo = [(d, s) for d in args.runs for s in args.steps]
    for k, (run_dir, step) in enumerate(todo, start=1):
        cfg = load_config(run_dir / "config.yaml")
        arm, seed = run_dir.name.rsplit("-seed", 1)
        if step == 0:  # every arm of a seed starts from the same weights: probed once per seed
            arm = "warm start"
        name = f"{arm.replace(' ', '_')}-seed{seed}"
        if all((name, step, b) in done for b in range(args.batches)):
            continue
        model, tok = load_policy(run_dir, step, cfg)
        train_rows = make_rows(cfg.data.synthetic, "train")
        for b in range(args.batches):
            if (name, step, b) in done:
                continue
            batch, reward = sample_batch(model, tok, cfg, train_rows, seed=1000 * step + 17 * int(seed) + b)
            m = sgd_entropy_probe(
                model,
                batch,
                lrs=cfg.learner.entropy_probe.lrs,
                temperature=cfg.generator.temperature,
                micro_batch_size=cfg.learner.micro_batch_size,
            )
            row = {"run": name, "arm": arm, "seed": int(seed), "step": step, "batch": b}
            row |= m | {"reward": reward, "tokens": int(batch.response_lengths.sum())}
            rows.append(row)
            done.add((name, step, b))
            with store.open("a") as f:
                f.write(json.dumps(row) + "\n")
        elapsed = time.perf_counter() - t0
        print(f"[probe] {k}/{len(todo)} {run_dir.name} step {step}: {elapsed:.0f} s", flush=True)
    lrs = sorted(cfg.learner.entropy_probe.lrs)
    steps = sorted({r["step"] for r in rows})
    trained = {r["run"] for r in rows if r["step"]}
    by_step = {s: decomposition_summary([r for r in rows if r["step"] == s]) for s in steps}
    per_step = [
        [x["link"], *(f"{by_step[s][i]['corr']:.2f}" for s in steps)]
        for i, x in enumerate(decomposition_summary(rows))
    ]
    header = ["link", *(("warm start" if s == 0 else f"step {s}") for s in steps)]
    (args.out / "probe_decomposition.md").write_text(
        f"{len(rows)} probes ({args.batches} on-policy batches per checkpoint) of the warm start and of "
        f"{len(trained)} trained runs at steps {[s for s in steps if s]}; every quantity per unit lr.\n\n"
        "**All probes pooled**\n\n"
        + render_decomposition_table(decomposition_summary(rows))
        + "\n**Correlation of each link, by checkpoint**\n\n"
        + "| "
        + " | ".join(header)
        + " |\n|"
        + "---|" * len(header)
        + "\n"
        + "".join("| " + " | ".join(r) + " |\n" for r in per_step)
    )
    plot(rows, lrs, args.out / "probe_decomposition.png")
    print((args.out / "probe_decomposition.md").read_text())


if __name__ == "__main__":
    main()
