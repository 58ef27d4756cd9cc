"""Predicts the makespan of the MoM layer's segment walks under two launch orders (no GPU).

  python -m benchmarks.simulate_walk_order [--shapes 8x2048,2x8192] [--memories 4] [--topk 2]
                                           [--slots 132] [--seed 0]

Each walk program (one (row, segment) walk x head x value block) occupies one SM slot for as many
steps as its segment has chunks (64 tokens); programs start, in launch order, on the first free
slot (greedy list scheduling, as the GPU's block scheduler does).  Segment lengths come from a
random top-k routing (uniform router, the layer's at initialisation) plus the shared memory's T
tokens per row.  Orders: "row order" (the walk ids row * S + segment, heads slowest, value blocks
fastest: the launch order before ``Config.longest_first``) and "longest first" (the walks sorted
by length).  Prints the makespan in chunk steps, the ideal (total / slots) and the longest walk.
The value-block rule is ``Config.walk_block_v``'s (64 columns when >= 256 such programs, else 32)
for dk = dv = 256, H = 4.  benchmarks/NOTES.md, session 11, compares it with the H100.
"""
from __future__ import annotations

import argparse
import heapq

import numpy as np


def makespan(lengths, slots: int) -> int:
    """Greedy list scheduling of jobs (in the given order) on ``slots`` identical machines."""
    free = [0] * slots
    heapq.heapify(free)
    end = 0
    for n in lengths:
        t = heapq.heappop(free)
        heapq.heappush(free, t + n)
        end = max(end, t + n)
    return end


def walk_lengths(batch: int, seq: int, memories: int, topk: int, rng, chunk: int = 64):
    """[B, E + 1] chunks per (row, segment): routed segments of a uniform random top-k routing,
    then the shared memory's (all T tokens)."""
    lengths = np.zeros((batch, memories + 1), np.int64)
    for b in range(batch):
        choice = np.argsort(rng.random((seq, memories)), axis=1)[:, :topk]
        counts = np.bincount(choice.reshape(-1), minlength=memories)
        lengths[b, :memories] = -(-counts // chunk)
        lengths[b, memories] = seq // chunk
    return lengths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x2048,2x8192", help="comma list of BxT")
    ap.add_argument("--memories", type=int, default=4)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--slots", type=int, default=132, help="walk programs resident at once "
                    "(one per SM of an H100)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print("| B x T | programs | ideal | row order | longest first | longest walk |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes.split(","):
        b, t = (int(v) for v in shape.split("x"))
        lengths = walk_lengths(b, t, args.memories, args.topk, rng).reshape(-1)   # walk id order
        walks = lengths.size * args.heads
        value_blocks = 4 if walks * 4 >= 256 else 8          # dv 256 in blocks of 64, else 32
        row_order = [n for _ in range(args.heads) for n in lengths for _ in range(value_blocks)]
        longest = sorted(row_order, reverse=True)
        print(f"| {b}x{t} | {len(row_order)} | {sum(row_order) / args.slots:.0f} | "
              f"{makespan(row_order, args.slots)} | {makespan(longest, args.slots)} | "
              f"{max(row_order)} |")


if __name__ == "__main__":
    main()
