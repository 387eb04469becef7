# Llama 250M with Pre-LN, trained as the authors trained it
# (247M parameters; C4 validation perplexity 21.92 in the paper's Table 1).
# The shared recipe is config/llama_paper.py; the LNS twin is llama_250m_lns.py; other schemes are one flag away.
#   python data/c4/prepare.py --layout rows --shards 58 --val_shards 2    # one pass of its 20.48M rows
#   torchrun --standalone --nproc_per_node=4 train.py config/llama_250m_pre.py

from config.llama_paper import *  # noqa: F401,F403

out_dir = 'out/llama_250m_pre'
norm_scheme = 'pre'
n_layer = 24
n_head = 16
n_embd = 768
ffn_hidden = 2560

# 512 sequences per step = batch_size x gradient_accumulation_steps, the accumulation steps counted over all GPUs
# together (4 GPUs: 128 x 1 each, as the authors ran it); batch_size is also the evaluation batch of the authors'
# estimator. With less memory per GPU, halve batch_size and double gradient_accumulation_steps.
batch_size = 128
gradient_accumulation_steps = 4

learning_rate = 1e-3
min_lr = 1e-4
max_iters = 40000
warmup_iters = 4000
