# Llama 71M with Pre-LN, trained as the authors trained it (71M parameters; not in the paper's Table 1).
# The shared recipe is config/llama_paper.py; the LNS twin is llama_71m_lns.py; other schemes are one flag away.
#   python data/c4/prepare.py --layout rows --shards 15 --val_shards 2    # one pass of its 5.12M rows
#   python train.py config/llama_71m_pre.py

from config.llama_paper import *  # noqa: F401,F403

out_dir = 'out/llama_71m_pre'
norm_scheme = 'pre'
n_layer = 12
n_head = 8
n_embd = 512
ffn_hidden = 1368

# 512 sequences per step = batch_size x gradient_accumulation_steps, the accumulation steps counted over all GPUs
# together (1 GPU: 64 x 8 each, as the authors ran it); batch_size is also the evaluation batch of
# the authors' estimator. With less memory per GPU, halve batch_size and double gradient_accumulation_steps.
batch_size = 64
gradient_accumulation_steps = 8

learning_rate = 1e-3
min_lr = 1e-4
max_iters = 10000
warmup_iters = 1000
