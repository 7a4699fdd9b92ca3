"""Data: dataset discovery, robust decoding, deduplication, the decoded-image cache and the split.

Modules are imported by name (`braintumor_flax.data.imageio`, `...datasets`) so that the server, which
only decodes uploads, never loads the dataset machinery.
"""
