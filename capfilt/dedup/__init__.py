"""Deduplication and decontamination: image hashes, near-duplicate search, duplicate groups.

    hashing   per image: SHA-256 of the bytes, SHA-256 of the decoded pixels, a 64-bit pHash,
              the grey level spread (blank images), the URL's domain
    groups    duplicate groups from the hashes: exact, same pixels, pHash within T bits
              (pigeonhole bands), semantic pairs, placeholders, evaluation images; the kept
              representative of each group and why every other image goes
    semantic  SemDeDup: faiss k-means of the embeddings, then the pairs of a cluster whose
              cosine similarity is at least 1 - eps
    bench     the 1M-embedding semantic benchmark and the hashing-versus-decoding one

Pure computation over arrays: the stage that reads and writes the dataset is
capfilt/stages/dedup.py.
"""
