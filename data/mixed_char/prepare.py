"""Several texts as one character corpus, validation held out from each: the last 10% of every source.

    python data/mixed_char/prepare.py                              # downloads the five public texts below
    python data/mixed_char/prepare.py --input ../shared/data       # the same texts from a local folder
    python data/mixed_char/prepare.py --input a.txt b.txt notes/   # your own: files, or folders of .txt files
    python data/mixed_char/prepare.py --train_chars 1000000 --out_dir data/mixed_char_1m   # a smaller training set

The default corpus (5.26M characters, 144 distinct) mixes tiny Shakespeare, slices of TinyStories' train and
validation splits, WikiText-2's validation and test splits (the tokenized version: <unk>, @-@) and 10 WebText
documents, so that 1,500 steps of 32 x 64 characters see each training character less than once. Each source is
split 90/10 by characters; the train.bin and val.bin parts are the sources' parts in name order, joined by a
newline. --train_chars keeps that many training characters, each source the same share of its training part
(its first characters), and leaves validation and the vocabulary as the whole corpus has them, so runs on the
slice and on the whole are scored on the same validation tokens. meta.json names every source with its counts.
"""

import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import fail, read_text, split_text, write_dataset  # noqa: E402

GITHUB = 'https://raw.githubusercontent.com'
# name -> (address at a fixed commit, sha256); the names are the files' paths in a local copy (--input FOLDER)
SOURCES = {
    'tinyshakespeare/input.txt': (
        f'{GITHUB}/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt',
        '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'),
    'tinystories/train_slice.txt': (
        f'{GITHUB}/s-ajaykumar/smallGPT/b8b899265a5574abd2c19d8857039309184a357c/data/tiny_stories.txt',
        'c56cfd24fb1c542b141a396184b822a4db3672abdb4c49c6aa843171c5e822a5'),
    'tinystories/valid_slice.txt': (
        f'{GITHUB}/yuninxia/moe-routing-bench/bb9bb0bd461aa77cf6ab89423b758f586a6f75d1/data/tinystories_val.txt',
        '5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6'),
    **{f'webtext-sample10/{i}.txt': (
        f'{GITHUB}/graykode/gpt-2-Pytorch/4f1e29944802b4491e70f9a87694167ce98bc058/data/webtext_train_10/{i}.txt',
        digest) for i, digest in enumerate([
            '62fb2e2fc6943a5722ffa14193be09a3b3867310be955aa42c5ac23562cc0fe2',
            '5a2795095418a8dd27a84923c1aa8037ca6f1dd796ff698cc4ed57bf157a3d4d',
            'a3f1c703cb4c237448b60d41327b84b41e4ca126b7fb2430511de2ce12103a61',
            'cddb66a0280680fb617acb29384a928d143af70d85f5c014007900858c887637',
            'e89295cefcd941b6b061cb8a3286d025690af513d47bf19634e94f56aeacc162',
            'abf627e08f4a8cdad2fda150f854dd1cfe0f0872cbdec79c6a9125900910ad66',
            '2e78ccefb8a394b51ecad8732752973eb255a2e926fc93b6095fe2f1c0026da8',
            '02727d895e4e737283e75ac962929895274cccc31d7ce05e4a364d51e3b6fbe8',
            '004e57ea0e6d34b944de363370a2606c82e9c67da0cbd0708b7b572e1b192161',
            'cb7098e28ebcf3a7aabedfc5c4dca5ab582e8e2295d8e3d252df3c2d57a5e2e1'])},
    'wikitext-2/test.txt': (
        f'{GITHUB}/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/data/wikitext-2/'
        'test.txt', 'd790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0'),
    'wikitext-2/valid.txt': (
        f'{GITHUB}/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/data/wikitext-2/'
        'valid.txt', 'f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8'),
}


def parse_args(argv, here):
    parser = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', nargs='+', help='text files, or folders whose .txt files (at any depth) are '
                                                   'each a source; default: download the five public texts')
    parser.add_argument('--train_chars', type=int, help='keep this many training characters, the same share of '
                                                        'each source (default: all)')
    parser.add_argument('--out_dir', default=here, help='where train.bin, val.bin and meta.json go')
    return parser.parse_args(argv)


def local_sources(inputs):
    """{name: path} of the given files (named by their file name) and of the .txt files under the given folders
    (named by their path inside the folder)."""
    found = {}
    for given in inputs:
        if os.path.isdir(given):
            paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(given) for name in names
                           if name.endswith('.txt'))
            if not paths:
                fail(f"{given} holds no .txt file; name text files or a folder of them with --input")
            found.update({os.path.relpath(path, given).replace(os.sep, '/'): path for path in paths})
        elif os.path.isfile(given):
            found[os.path.basename(given)] = given
        else:
            fail(f"--input {given} is neither a file nor a folder; name text files or folders of them")
    return found


def downloaded_sources(folder):
    """{name: path} of the default sources, each downloaded once into folder and checked against its sha256."""
    found = {}
    for name, (url, digest) in SOURCES.items():
        path = os.path.join(folder, name.replace('/', '_'))
        read_text(None, url, path)
        with open(path, 'rb') as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                os.remove(path)  # the next run downloads it again
                fail(f"{url} did not give the expected text (sha256 differs); run again, or pass --input with a "
                     f"local copy of the texts")
        found[name] = path
    return found


def build(texts, train_chars=None):
    """(train text, validation text, meta) of {name: text}: each source split 90/10, the parts in name order
    joined by a newline, the training parts cut to train_chars in proportion when it is given."""
    parts = {name: split_text(text) for name, text in sorted(texts.items())}
    total = sum(len(train) for train, _ in parts.values())
    if train_chars is not None and not 0 < train_chars <= total:
        fail(f"--train_chars must be between 1 and the corpus's {total:,} training characters, not {train_chars:,}")
    kept = {name: len(train) if train_chars is None else round(len(train) * train_chars / total)
            for name, (train, _) in parts.items()}
    train_text = '\n'.join(train[:kept[name]] for name, (train, _) in parts.items())
    val_text = '\n'.join(val for _, val in parts.values())
    chars = ''.join(sorted(set(''.join(texts.values())) | {'\n'}))  # the joins' newline, whatever the texts hold
    sources = {name: {'characters': len(texts[name]), 'train': kept[name], 'val': len(val)}
               for name, (_, val) in parts.items()}
    return train_text, val_text, {'tokenizer': 'char', 'vocab_size': len(chars), 'chars': chars, 'sources': sources}


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    args = parse_args(argv, here)
    paths = local_sources(args.input) if args.input else downloaded_sources(os.path.join(here, 'downloads'))
    texts = {name: read_text(path, None, path) for name, path in paths.items()}
    train_text, val_text, meta = build(texts, args.train_chars)
    index = {c: i for i, c in enumerate(meta['chars'])}
    print(f"{len(texts)} source(s), {sum(map(len, texts.values())):,} characters, {meta['vocab_size']} distinct")
    write_dataset(args.out_dir, [index[c] for c in train_text], [index[c] for c in val_text], meta)


if __name__ == '__main__':
    main()
