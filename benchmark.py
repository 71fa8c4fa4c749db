#!/usr/bin/env python3
"""Benchmark VAN's execution paths (train/inference throughput, memory, MFU): see vancls/benchmark.py."""
from vancls.benchmark import main

if __name__ == '__main__':
    main()
