"""Inverse-set sampling: optimisation (neuroviz.synthesis) against MCMC (MALA), same target.

Hada & Carreira-Perpinan claim that sampling the inverse set by optimisation is much
faster than Markov chain Monte Carlo and gives more diverse samples. This benchmark measures
it on one neuron of the real MobileNetV2 (offline weights):

- target: 75 % of the neuron's max over a few real photos (scikit-image samples, extracted
  through the production path into a temporary store); tolerance 5 % of that max;
- optimisation: ``synthesis.synthesize`` with 16 samples of that one level (defaults);
- MCMC: 16 parallel Metropolis-adjusted Langevin (MALA) chains in the *same* Fourier,
  colour-decorrelated image parameterisation, targeting
  ``p(z) ~ N(z; 0, prior_std^2) * exp(-tv_weight * TV(x) - ((a(x) - t) / max)^2 / (2 tau^2))``
  with tau = tolerance / 2 (95 % of that factor's mass lies within tolerance); step size
  adapted per chain during burn-in. A chain yields its sample at its first state within
  tolerance after burn-in (also reported: the first state within tolerance at all, which
  is optimistic for MCMC). MALA costs one forward+backward per step, like one optimisation
  step, and is a stronger baseline than random-walk Metropolis-Hastings;
- both: wall and CPU time until the 16 samples exist (MCMC capped by --mcmc-budget),
  activation error, and diversity = mean pairwise cosine distance of the samples in the
  network's penultimate features (the same function for both).

Run: ``python benchmarks/bench_synthesis.py [--layer features.14] [--size 128] [--mcmc-budget 240]``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from neuroviz import datasets, extract, models, synthesis
from neuroviz.store import Store

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "immunohistochemistry",
                  "camera", "coins", "horse", "page", "text", "moon", "brick", "grass", "gravel", "retina", "cat", "colorwheel")


@dataclass
class Outcome:
    method: str
    samples: int
    wall_s: float
    cpu_s: float
    steps: int
    mean_error: float
    max_error: float
    diversity: float
    note: str = ""


def probe_folder(root: Path) -> Path:
    """Real photos from scikit-image (offline), saved as files for a production probe set."""
    from PIL import Image
    from skimage import data

    folder = root / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for name in SKIMAGE_PHOTOS:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        try:
            arr = loader()
        except Exception:  # some samples need optional downloads
            continue
        if isinstance(arr, tuple):
            arr = arr[0]
        img = Image.fromarray(np.asarray(arr)).convert("RGB")
        img.thumbnail((320, 320))
        img.save(folder / f"{name}.png")
    return folder


def activations_on_prior_noise(model, layer: str, pooling: str, size: int, prior_std: float, seed: int,
                                device: torch.device) -> np.ndarray:
    """Every neuron's activation on 16 draws from the MCMC prior (16 x neurons)."""
    from neuroviz.hooks import LayerRecorder, pool, to_batch_first

    gen = torch.Generator().manual_seed(seed + 1)
    images = synthesis.FourierImage.noise(16, size, 1.0, prior_std, gen, device).images().detach()
    prep = model.preprocessing
    x = (images - torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)) / torch.tensor(prep.std, device=device).view(1, 3, 1, 1)
    info = model.layer(layer)
    with torch.no_grad(), LayerRecorder(model.module.to(device), [layer]) as rec:
        model.module(x)
    return pool(to_batch_first(rec.outputs[layer], info.layout), info.layout, pooling).float().cpu().numpy()


def pick_neuron(stats, noise_acts: np.ndarray) -> int:
    """A neuron that noise does not already drive near the target: the largest observed max
    among neurons whose mean activation on prior noise is below 25 % of that max."""
    maxima = stats.set_index("neuron")["max"]
    quiet = [n for n, m in maxima.items() if m > 0 and noise_acts[:, n].mean() < 0.25 * m]
    pool_ = quiet or list(maxima.index)
    return int(max(pool_, key=lambda n: maxima[n]))


def run_mala(model, plan: synthesis.SynthesisPlan, n_chains: int, size: int, budget_s: float, prior_std: float,
             burn_in: int, seed: int, device: torch.device) -> tuple[list[Outcome], np.ndarray]:
    """Parallel MALA chains. Two readings of one run: each chain's first state within
    tolerance (no burn-in: optimistic, such a state is not yet a draw from the target), and
    its first state within tolerance after ``burn_in`` steps (the usual MCMC protocol)."""
    cfg = plan.request.config
    target = plan.targets[0]
    forward = synthesis.TargetActivations(model, plan.targets, device)
    tau = cfg.tolerance / 2
    t = torch.tensor(target.levels[0], device=device)
    gen = torch.Generator().manual_seed(seed)

    def energy_and_grad(z: torch.Tensor):
        param = synthesis.FourierImage(z.detach().clone(), size, cfg.decay_power)
        images = param.images()
        acts = forward(images)[0][:, 0]
        err = (acts - t) / target.scale
        prior = (param.spectrum ** 2).flatten(1).sum(1) / (2 * prior_std ** 2)
        energy = prior + cfg.tv_weight * synthesis.total_variation(images) + err ** 2 / (2 * tau ** 2)
        (grad,) = torch.autograd.grad(energy.sum(), [param.spectrum])
        return energy.detach(), grad.detach(), err.detach().abs(), images.detach()

    shape = (n_chains, 3, size, size // 2 + 1, 2)
    z = (torch.randn(shape, generator=gen) * prior_std).to(device)
    energy, grad, err, images = energy_and_grad(z)
    eps = torch.full((n_chains,), 1e-5, device=device)
    readings = {}
    for name in ("first", "burned"):
        readings[name] = dict(found=torch.zeros(n_chains, dtype=torch.bool, device=device),
                              samples=torch.zeros(n_chains, 3, size, size, device=device),
                              err=torch.zeros(n_chains, device=device), wall=float("nan"), cpu=float("nan"), steps=0)
    accepted = 0
    steps = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < budget_s and not bool(readings["burned"]["found"].all()):
        steps += 1
        e = eps.view(-1, 1, 1, 1, 1)
        noise = torch.randn(shape, generator=gen).to(device)
        proposal = z - e * grad + torch.sqrt(2 * e) * noise
        p_energy, p_grad, p_err, p_images = energy_and_grad(proposal)
        # log q(z | z') - log q(z' | z) of the Langevin proposal
        forward_gap = ((proposal - z + e * grad) ** 2).flatten(1).sum(1)
        backward_gap = ((z - proposal + e * p_grad) ** 2).flatten(1).sum(1)
        log_alpha = energy - p_energy + (forward_gap - backward_gap) / (4 * eps)
        accept = torch.log(torch.rand(n_chains, generator=gen).to(device)) < log_alpha
        accepted += int(accept.sum())
        mask = accept.view(-1, 1, 1, 1, 1)
        z = torch.where(mask, proposal, z)
        grad = torch.where(mask, p_grad, grad)
        energy = torch.where(accept, p_energy, energy)
        err = torch.where(accept, p_err, err)
        images = torch.where(accept.view(-1, 1, 1, 1), p_images, images)
        if steps <= burn_in:  # adapt the step size only during burn-in (then the chain is a proper MALA)
            eps = eps * torch.where(accept, 1.1, 0.9)
        for name, reading in readings.items():
            if name == "burned" and steps <= burn_in:
                continue
            candidates = ~reading["found"] & (err <= cfg.tolerance)
            if candidates.any():
                quantised = (images.clamp(0, 1) * 255).round() / 255  # judged on the 8-bit image, as the optimiser is
                with torch.no_grad():
                    q_err = (forward(quantised, grad=False)[0][:, 0] - t).abs() / target.scale
                take = candidates & (q_err <= cfg.tolerance)
                reading["samples"][take] = quantised[take]
                reading["err"][take] = q_err[take]
                reading["found"] |= take
                if bool(reading["found"].all()) and math.isnan(reading["wall"]):
                    reading["wall"], reading["cpu"], reading["steps"] = time.perf_counter() - t0, time.process_time() - c0, steps
        if steps % 50 == 0:
            print(f"  MALA step {steps}: first hits {int(readings['first']['found'].sum())}/{n_chains}, after burn-in "
                  f"{int(readings['burned']['found'].sum())}/{n_chains}; median error {float(err.median()):.1%}, "
                  f"acceptance {accepted / (steps * n_chains):.2f}, {time.perf_counter() - t0:.0f}s", flush=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    outcomes = []
    for name, label in (("first", "MCMC (MALA), first hit, no burn-in"), ("burned", f"MCMC (MALA), after {burn_in}-step burn-in")):
        r = readings[name]
        got = r["found"].cpu().numpy()
        emb = synthesis.penultimate_features(model, r["samples"][r["found"]]) if got.any() else np.zeros((0, 1))
        errs = r["err"].cpu().numpy()[got]
        done = bool(got.all())
        outcomes.append(Outcome(
            label, int(got.sum()), r["wall"] if done else wall, r["cpu"] if done else cpu, r["steps"] if done else steps,
            float(errs.mean()) if got.any() else float("nan"), float(errs.max()) if got.any() else float("nan"),
            synthesis.mean_pairwise_cosine_distance(emb),
            note=f"acceptance {accepted / max(steps * n_chains, 1):.2f}" + ("" if done else f"; stopped at the {budget_s:.0f}s budget"),
        ))
    last_states = synthesis.mean_pairwise_cosine_distance(synthesis.penultimate_features(model, images))
    for outcome in outcomes:
        outcome.note += f"; diversity of the chains' last states {last_states:.3f}"
    shown = readings["burned"]["samples"].clone()
    missing = ~readings["burned"]["found"]
    shown[missing] = images[missing]  # chains without a sample: their last state
    return outcomes, shown.cpu().numpy()


def _fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="offline:mobilenet_v2")
    parser.add_argument("--layer", default="features.14")
    parser.add_argument("--neuron", type=int, help="default: the neuron with the largest max over the photos")
    parser.add_argument("--level", type=float, default=0.75)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--mcmc-budget", type=float, default=240.0, help="seconds")
    parser.add_argument("--prior-std", type=float, default=0.2,
                        help="std of the MCMC prior on Fourier coefficients (0.2 gives the pixel contrast of the optimiser's samples)")
    parser.add_argument("--burn-in", type=int, default=200, help="MALA steps before a state may count as a sample")
    parser.add_argument("--threads", type=int, help="torch threads (1 is much faster on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="save both sample sets as a PNG here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = Store(root / "cache")
        model = models.create(args.model)
        ps = datasets.from_folder(probe_folder(root), cache_dir=store.root)
        (run,) = extract.extract(model, ps, [args.layer], store, k=5, batch_size=8, chunk_size=8)
        stats = store.neuron_stats(run.run_key)
        noise_acts = activations_on_prior_noise(model, args.layer, run.pooling, args.size, args.prior_std, args.seed, device)
        neuron = args.neuron if args.neuron is not None else pick_neuron(stats, noise_acts)
        observed_max = float(stats.loc[stats["neuron"] == neuron, "max"].iloc[0])
        print(f"{args.model} {args.layer} neuron {neuron}: observed max {observed_max:.4g} over {len(ps)} photos; "
              f"target {args.level:.0%} = {args.level * observed_max:.4g}; on noise images drawn from the MCMC prior it is "
              f"{noise_acts[:, neuron].mean() / observed_max:.0%} of the max; {args.size}px; device {device}; "
              f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")

        request = synthesis.SynthesisRequest(layer=args.layer, neuron=neuron, levels=(args.level,), n_samples=args.samples,
                                             seed=args.seed).with_config(image_size=args.size)
        c0 = time.process_time()
        result = synthesis.synthesize(model, request, store, run, device=str(device), use_cache=False)
        opt = Outcome("optimisation (neuroviz)", result.n_within, result.timings["total_s"], time.process_time() - c0,
                      result.steps_run, float(result.errors.mean()), float(result.errors.max()), float(result.diversity[0]))
        print(f"  optimisation: {result.summary()}")

        plan = synthesis.plan_synthesis(model, request, store, run)
        mcmc_rows, mcmc_images = run_mala(model, plan, args.samples, args.size, args.mcmc_budget, args.prior_std,
                                          args.burn_in, args.seed, device)

    rows = [opt, *mcmc_rows]
    print()
    print("| method | samples within 5% | wall s | CPU s | steps | mean error | max error | diversity | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.method} | {r.samples}/{args.samples} | {r.wall_s:.1f} | {r.cpu_s:.1f} | {r.steps} | {_fmt(r.mean_error, '.2%')} | "
              f"{_fmt(r.max_error, '.2%')} | {_fmt(r.diversity, '.3f')} | {r.note} |")
    for mcmc in mcmc_rows:
        if mcmc.samples:
            print(f"{mcmc.method}: {mcmc.wall_s / opt.wall_s:.1f}x the optimiser's wall time" + ("" if mcmc.samples == args.samples else
                  f", and only {mcmc.samples}/{args.samples} samples within the {args.mcmc_budget:.0f}s budget"))
        else:
            print(f"{mcmc.method}: no sample within tolerance in {args.mcmc_budget:.0f}s.")
    print("diversity = mean pairwise cosine distance in the penultimate features (input of the classifier).")
    if args.out:
        from PIL import Image

        tiles = [result.images[0, i] for i in range(result.images.shape[1])]
        tiles += [(np.transpose(img, (1, 2, 0)) * 255).round().astype(np.uint8) for img in mcmc_images]
        n = args.samples
        canvas = Image.new("RGB", (n * args.size, 2 * args.size), "white")
        for i, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile), ((i % n) * args.size, (i // n) * args.size))
        canvas.save(args.out)
        print(f"samples (top: optimisation; bottom: MCMC after burn-in, or a chain's last state): {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
