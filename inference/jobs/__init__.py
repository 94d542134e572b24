"""Long-context jobs: a document and an instruction, answered in the background.

A job is one or more passes of the model, each a Generation on the model's bulk
queue. A document that fits the context is one pass; one that does not is split
into chunks (map), whose answers are combined (reduce), level by level, until
one answer is left. The worker's generation_finished signal moves a job on.

An API batch (batches.py) is a job too: each line of its input file is one pass.
"""
