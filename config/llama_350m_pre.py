# Llama 350M with Pre-LN, trained as the authors trained it
# (368M parameters; C4 validation perplexity 19.58 in the paper's Table 1).
# The shared recipe is config/llama_paper.py; the LNS twin is llama_350m_lns.py; other schemes are one flag away.
#   python data/c4/prepare.py --layout rows --shards 87 --val_shards 2    # one pass of its 30.72M rows
#   torchrun --standalone --nproc_per_node=4 train.py config/llama_350m_pre.py

from config.llama_paper import *  # noqa: F401,F403

out_dir = 'out/llama_350m_pre'
norm_scheme = 'pre'
n_layer = 24
n_head = 16
n_embd = 1024
ffn_hidden = 2736

# 512 sequences per step = batch_size x gradient_accumulation_steps, the accumulation steps counted over all GPUs
# together (4 GPUs: 128 x 1 each, as the authors ran it); batch_size is also the evaluation batch of the authors'
# estimator. With less memory per GPU, halve batch_size and double gradient_accumulation_steps.
batch_size = 128
gradient_accumulation_steps = 4

learning_rate = 5e-4  # the authors' script; the paper's text says 1e-3
min_lr = 5e-5
max_iters = 60000
warmup_iters = 6000
