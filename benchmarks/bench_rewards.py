"""Time reward scoring: N images in batches vs one image at a time.

    python benchmarks/bench_rewards.py --n 32 --kind dino --model tiny

`--model` is the checkpoint for the encoder kinds named by `--kind` (default: all kinds); the
other kinds use the offline `tiny` preset. Reference features are computed in the warm-up, so the
timings are the per-image cost a training or evaluation loop pays.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REWARDS = ("dino", "clip_i", "clip_t", "lambda_harmonic")
ENCODER_OF = {"dino": "dino", "clip_i": "clip", "clip_t": "clip", "align_i": "align", "align_t": "align",
              "lambda_harmonic": "align"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="images to score")
    parser.add_argument("--kind", nargs="+", choices=("dino", "clip", "align"), default=["dino", "clip", "align"],
                        help="encoder kinds that use --model (others use 'tiny')")
    parser.add_argument("--model", default="tiny", help="checkpoint for --kind: hub id, folder or 'tiny'")
    parser.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=sorted(ENCODER_OF))
    parser.add_argument("--size", type=int, default=64, help="side of the generated test images (px)")
    parser.add_argument("--batch-size", type=int, default=32, help="encoder batch size")
    parser.add_argument("--input", choices=("pil", "tensor"), default="pil", help="PIL images or a (N,3,H,W) tensor")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    return parser.parse_args(argv)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import numpy as np
    import torch

    from rewardbooth.errors import RewardboothError
    from rewardbooth.mini.world import make_subject
    from rewardbooth.rewards import Subject, build_reward

    torch.set_num_threads(args.threads)
    models = {kind: (args.model if kind in args.kind else "tiny") for kind in ("dino", "clip", "align")}
    refs = make_subject(seed=0, num_images=3).resized(args.size)
    generated = [im for seed in range(1, args.n + 1) for im in make_subject(seed=seed, num_images=1).resized(args.size).images]
    subject = Subject(refs.name, refs.images, identifier="sks", class_noun=refs.class_noun)
    prompts = [f"a sks {refs.class_noun} number {i} on the beach" for i in range(args.n)]
    images = generated
    if args.input == "tensor":
        images = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in generated])).permute(0, 3, 1, 2)
        images = images.to(args.device)

    try:  # load everything first, so a bad checkpoint fails before the table starts
        rewards = [build_reward(name, models=models, device=args.device) for name in args.rewards]
    except RewardboothError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    print(f"{args.n} images of {args.size} px ({args.input}), batch size {args.batch_size}, "
          f"{args.threads} thread(s), device {args.device}, torch {torch.__version__}")
    header = f"{'reward':<16} {'encoder':<34} {'batched s/img':>14} {'one-by-one s/img':>17} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name, reward in zip(args.rewards, rewards):
        reward.encoder.batch_size = args.batch_size
        with torch.no_grad():
            reward(images[:2], prompts[:2], subject)  # warm-up: loads, caches reference features
            reward(images[:1], prompts[:1], subject)
            batched = best_time(lambda r=reward: r(images, prompts, subject), args.repeats)
            single = best_time(lambda r=reward: [r(images[i : i + 1], prompts[i : i + 1], subject) for i in range(args.n)],
                               args.repeats)
        encoder = f"{reward.encoder.kind}:{reward.encoder.name}"
        print(f"{name:<16} {encoder:<34} {batched / args.n:>14.6f} {single / args.n:>17.6f} {single / batched:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
