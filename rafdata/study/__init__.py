"""The paper's perceptual two-alternative forced-choice study (section 3, appendix B).

One job per module: :mod:`.keyfile` (the study folder's key and manifest), :mod:`.sampling`
(queries and candidates from a store), :mod:`.pages` (face crops and HTML), :mod:`.serve`
(local answer collection) and :mod:`.analyze` (shares, intervals, tests, Figure 3).
"""
