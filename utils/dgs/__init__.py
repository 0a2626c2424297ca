"""Dynamic Gradient Shaping, the method: one training step (step.py) and its parts.

    step.py           DGSStep: forward, losses, valuation, the two backward passes, shaping, Adam
    shapley.py        exact Shapley values of the modalities from the coalitions' values
    pareto.py         MMPareto: merge an encoder's multimodal and unimodal gradients
    ogm.py            OGM / OGM-GE: κ_m damps the dominant modality's encoder (+ noise)
    noise.py          OGM-GE's Gaussian noise, drawn fast on the CPU
    shaping.py        MMPareto then OGM on each encoder group (segments.py: per-tensor sums)
    shaping_graph.py  the same, replayed from CUDA graphs on the GPU
"""
