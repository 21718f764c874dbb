"""COCO box and mask AP of an exported graph or a training checkpoint, measured through the path that
serves it (evaluation/evaluate.py); ``python -m evaluation``."""
