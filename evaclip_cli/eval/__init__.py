"""The one evaluation core, shared by ``evaclip eval`` and training's periodic eval.

``metrics``   counts / R@k (CLIP_benchmark's definitions), summed or gathered over ranks
``prompts``   class names and templates (checked), the zero-shot classifier and its disk cache, text encoding
``tokenize``  an exact, faster path through open_clip's ``SimpleTokenizer`` (same ids, tested)
``adapters``  image sets and video sets as the loops read them (list, decode, filler, embed, targets)
``prefetch``  decode-ahead: worker processes decode a rank's images from before the model loads (bit-identical
              to the model's transform, checked before use)
``loops``     THE classification loop and THE retrieval loop (padded rank slices, skip-and-count)
``runner``    the entry points: ``run_zeroshot``, ``run_retrieval``, ``run_video``, ``run_suite``, ``evaluate_live``
``suite``     benchmark suites, aggregates, chart; ``report``: results as markdown
"""
