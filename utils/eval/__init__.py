"""Evaluation: encoding a caption set and scoring retrieval (`encode`), what eval.py runs (`run`), zero-shot
classification (`zeroshot`), the feature cache (`feature_cache`) and the WiSE-FT sweep (`wise_ft`)."""
