"""Transfer evaluation of a trained encoder (paper arXiv 2009.07995, section 4.3; the original code's
`lowshot_svm.py` and `finetune_imagenet.py`).

- `svm`: low-shot linear SVMs on frozen, L2-normalised pooled features (VOC07 per-class binary, mAP with
  the "all points" AP of `ap`; Places205 multiclass, top-1), k = 1, 2, 4, 8, 16 images per class, 5 draws;
- `knn`: cosine kNN (k = 20, temperature-weighted votes) on frozen features of any labelled folder;
- `finetune`: the whole network fine-tuned on a seeded fraction of an ImageNet train folder, by the trainer
  itself (mopro_fast.training.train), with a recipe like the training recipes.

`datasets` reads the folders (VOC2007, Places205 lists, ImageFolder), `features` computes and caches the
frozen features. scikit-learn (the SVMs) is an optional extra: `pip install 'mopro-fast[transfer]'`.
"""
