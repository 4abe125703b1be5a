"""Posterior moments of a data set's model by a long NUTS run (Pyro's NUTS on tmcgraph's JointDensity).

The ground truth `benchmarks/hierarchical.py --reference` compares each method's posterior means against.  The
potential is ``-log p(x, z)`` of the declared model at the latents' values (`tmcgraph.JointDensity`), so NUTS
and the TMC methods see the very same model.  Every latent of these models is real-valued; a model with an
enumerated (discrete) latent is refused.

Writes, per latent: the posterior mean and variance over the kept samples (plates in the latent's order, then its
event dims), with the run's settings, the number of divergences and Pyro's effective sample sizes.

Run: python benchmarks/nuts_reference.py --dataset radon --samples 2000 --warmup 1000 --json F [--folder D]

``--compare A B`` prints how far run A's posterior means lie from run B's, in B's posterior standard deviations
(the root mean square over every latent element, and the worst element): with B a longer, independently seeded
run, the reference A's own Monte Carlo error, the floor under the errors `hierarchical.py` reports against it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import pyro
import torch
from _util import standardised_errors  # benchmarks/, the script's directory
from pyro.infer.mcmc import MCMC, NUTS

from tmcgraph import JointDensity
from tmcgraph.arguments import output_file
from tmcgraph.learn import mean_field


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="radon")
    parser.add_argument("--folder", default=None)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--max-tree-depth", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=output_file, default=None, help="where to write the run (required to run)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                        help="compare two runs' JSON files instead of running")
    args = parser.parse_args(argv)
    if args.compare:
        rms, worst, name, count = compare(*args.compare)
        print(f"{args.compare[0]} against {args.compare[1]}: RMS {rms:.3f} posterior sds over {count} latent elements, "
              f"worst {worst:.3f} ({name})")
        return 0
    if args.json is None:
        parser.error("--json F is required to run NUTS")
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    module = importlib.import_module(f"tmcgraph.datasets.{args.dataset}")
    ds = module.load(args.folder) if args.folder else module.load()
    model = ds.model()
    enumerated = [n for n in model.latents() if model.sites[n].enumerate]
    if enumerated:
        raise SystemExit(f"{ds.name}: latents {enumerated} are discrete (enumerated); NUTS needs continuous ones")
    shapes = {n: q.plate_shape + q.event_shape for n, q in mean_field(model, data=ds.train).items()}
    density = JointDensity(model)

    def potential(params):
        values = {n: params[n].unsqueeze(0) for n in shapes}  # one particle
        return -density.log_prob(values, ds.train)[0]

    kernel = NUTS(potential_fn=potential, max_tree_depth=args.max_tree_depth)
    mcmc = MCMC(kernel, num_samples=args.samples, warmup_steps=args.warmup,
                initial_params={n: torch.zeros(s) for n, s in shapes.items()})
    began = time.perf_counter()
    mcmc.run()
    seconds = time.perf_counter() - began
    samples = mcmc.get_samples()
    diagnostics = mcmc.diagnostics()
    ess = {n: float(torch.as_tensor(diagnostics[n]["n_eff"]).min()) for n in shapes}
    divergences = int(sum(len(v) for v in diagnostics.get("divergences", {}).values()))
    out = {"dataset": ds.name, "samples": args.samples, "warmup": args.warmup, "seed": args.seed,
           "max_tree_depth": args.max_tree_depth, "seconds": seconds, "divergences": divergences,
           "min_ess": ess,
           "mean": {n: samples[n].mean(0).tolist() for n in shapes},
           "var": {n: samples[n].var(0).tolist() for n in shapes}}
    with open(args.json, "w") as f:
        json.dump(out, f)
    print(f"{ds.name}: NUTS {args.samples} samples after {args.warmup} warm-up, {seconds:.0f} s, "
          f"{divergences} divergences, smallest ESS {min(ess.values()):.0f} ({min(ess, key=ess.get)})")
    return 0


def compare(a: str, b: str):
    """``(rms, worst, worst latent, elements)`` of ``(mean_A - mean_B) / sd_B`` over every latent element."""
    with open(a) as f:
        A = json.load(f)
    with open(b) as f:
        B = json.load(f)
    errors = standardised_errors(A["mean"], B)
    flat = torch.cat(list(errors.values())).abs()
    worst_name = max(errors, key=lambda n: float(errors[n].abs().max()))
    return float(flat.pow(2).mean().sqrt()), float(flat.max()), worst_name, flat.numel()


if __name__ == "__main__":
    raise SystemExit(main())
