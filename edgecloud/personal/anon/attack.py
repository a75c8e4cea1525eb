"""The attacker: the cloud trying to tell which user sent an upload from its embedding alone.

* **classifier**: given a window of uploads labelled by user (the training period), fit multinomial logistic
  regression from embedding to user and attribute later uploads (held-out period). Top-1 vs chance = 1/users.
* **linker**: no labels; k-means with one cluster per user over the later uploads, clusters matched to users by
  the Hungarian algorithm (the best case for the attacker), top-1 accuracy and the adjusted Rand index.
"""

from __future__ import annotations

import numpy as np


def classifier_top1(z_win: np.ndarray, u_win: np.ndarray, z_later: np.ndarray, u_later: np.ndarray,
                    seed: int = 0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if np.ptp(z_win, axis=0).max() == 0:  # constant uploads carry nothing: the best guess is one fixed user
        return float(np.mean(u_later == np.bincount(u_win).argmax()))
    sc = StandardScaler().fit(z_win)
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed).fit(sc.transform(z_win), u_win)
    return float(np.mean(clf.predict(sc.transform(z_later)) == u_later))


def linker(z: np.ndarray, u: np.ndarray, n_users: int, seed: int = 0) -> dict:
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    if np.ptp(z, axis=0).max() == 0:
        return {"top1": float(np.bincount(u).max() / len(u)), "ari": 0.0}
    lab = KMeans(n_users, n_init=4, random_state=seed).fit_predict(z)
    m = np.zeros((n_users, n_users))
    np.add.at(m, (lab, u), 1)
    r, c = linear_sum_assignment(-m)
    return {"top1": float(m[r, c].sum() / len(u)), "ari": float(adjusted_rand_score(u, lab))}
