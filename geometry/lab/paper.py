"""The paper's figures the demo's report and figures stand beside (Shen et al. 2026, Qwen3-8B student).

Table 1 and the localisation table exactly; angles, NSS and Sim_K at 20% as the orders of magnitude its text
gives (docs/metrics.md, "What a comparison of runs should show").
"""

PAPER_SPARSITY = {"sft": 0.081, "opd": 0.516, "rlvr": 0.772}
PAPER_LOCALISATION = {  # density, principal-mask overlap, low-magnitude-mask overlap
    "sft": (0.9273, 0.2966, 0.3188), "opd": (0.4628, 0.2731, 0.5359), "rlvr": (0.2776, 0.2665, 0.7348)}
PAPER_ANGLES = {"sft": "> 10", "opd": "~ 1", "rlvr": "< 0.5"}
PAPER_NSS = {"sft": "~1e-3", "opd": "~1e-4", "rlvr": "~1e-5"}
PAPER_SIM20 = {"sft": "0.4-0.6", "opd": "~1", "rlvr": "0.4-0.6"}
