"""Matching: from query and reference folders to a scored submission.

    index        ReferenceIndex (faiss, several views per reference), shortlists, score normalisation
    verify       SIFT + RANSAC verification of shortlisted pairs
    calibration  the score calibration (pair logit fused with descriptor and verification signals), cross-fit
    rerank       the matching run: shortlist -> pair scores -> verification -> calibrated submission
    calibrate    fitting the calibration on a labelled benchmark (`scripts/calibrate.py`)
"""
