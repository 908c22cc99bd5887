"""GPU stages: the only package that imports torch, open_clip and faiss (DESIGN.md section 5).

Importing this package imports nothing heavy; its modules import those libraries themselves.
"""
