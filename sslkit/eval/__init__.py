"""Is the encoder any good? kNN and linear probes, fine-tuning, t-SNE and attention maps.

Every evaluation embeds labelled images with the model's own preprocessing (the embed
code), scores the pretrained encoder beside a randomly initialised one of the same
architecture, prints a table and writes a JSON report into the run's ``eval/`` folder.
"""
