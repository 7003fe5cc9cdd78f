"""Matching: from query and reference folders to a scored submission.

    index        ReferenceIndex (faiss, several views per reference), shortlists, score normalisation
    verify       SIFT + RANSAC verification of shortlisted pairs
    calibration  the score calibration (pair logit fused with descriptor and verification signals), cross-fit
    config       RerankConfig: the matching run's options
    rerank       the matching run: shortlist -> pair scores -> verification -> calibrated submission
    calibrate    fitting the calibration on a labelled benchmark (`scripts/calibrate.py`)
    detector     the library API: CopyDetector, a saved and incremental reference collection to match against
    store        what a saved collection keeps per reference (SQLite: vectors, pair-ViT input, SIFT keypoints)
    inputs       image inputs of the library API (paths, folders, PIL images) as id -> file
"""
