"""Benchmarks: building them, running every matcher on one, and the demo.

    make     a DISC21-style benchmark (references, edited queries, ground truth) from a folder of photos
    compare  every matcher (PDQ, pHash, SIFT, descriptor, rerank) on one benchmark, with speed and scaling
    demo     the end-to-end demo on the photos shipped in the package
"""
