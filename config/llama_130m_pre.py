# Llama 130M with Pre-LN, trained as the authors trained it
# (134M parameters; C4 validation perplexity 26.73 in the paper's Table 1).
# The shared recipe is config/llama_paper.py; the LNS twin is llama_130m_lns.py; other schemes are one flag away.
#   python data/c4/prepare.py --layout rows --shards 29 --val_shards 2    # one pass of its 10.24M rows
#   python train.py config/llama_130m_pre.py

from config.llama_paper import *  # noqa: F401,F403

out_dir = 'out/llama_130m_pre'
norm_scheme = 'pre'
n_layer = 12
n_head = 12
n_embd = 768
ffn_hidden = 2048

# 512 sequences per step = batch_size x gradient_accumulation_steps, the accumulation steps counted over all GPUs
# together (1 GPU: 64 x 8 each, as the authors ran it); batch_size is also the evaluation batch of
# the authors' estimator. With less memory per GPU, halve batch_size and double gradient_accumulation_steps.
batch_size = 64
gradient_accumulation_steps = 8

learning_rate = 1e-3
min_lr = 1e-4
max_iters = 20000
warmup_iters = 2000
