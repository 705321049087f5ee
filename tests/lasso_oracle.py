"""Independent LASSO oracle (scipy) shared by the solver tests and its benchmark.

Not used by the library: scipy is a test-only dependency.
"""

import numpy as np
import scipy.optimize

LAM = 1e-5


def objective(A, b, z, lam=LAM):
    return 0.5 * np.sum((A @ z - b) ** 2) + lam * np.sum(np.abs(z))


def kkt_violation(A, b, z, lam=LAM):
    """Largest violation of the LASSO optimality conditions, relative to lam.

    With c = A^T (b - A z): c_j = lam sign(z_j) on the support, |c_j| <= lam off it.
    """
    c = A.T @ (b - A @ z)
    on = z != 0
    on_error = np.abs(c[on] - lam * np.sign(z[on])).max(initial=0.0)
    off_error = np.maximum(np.abs(c[~on]) - lam, 0.0).max(initial=0.0)
    return max(on_error, off_error) / lam


def scipy_lasso(A, b, lam=LAM):
    """Exact LASSO through its dual, solved by scipy's NNLS (Lawson & Hanson, ch. 23).

    The dual of min 1/2 ||A z - b||^2 + lam ||z||_1 projects b onto
    {theta: |A^T theta| <= lam}; with x = theta - b this is the least-distance problem
    min ||x|| s.t. G x >= h, G = [-A^T; A^T], h = [A^T b - lam; -A^T b - lam]. NNLS on
    E = [G^T; h^T], f = e_last gives u >= 0 and r = E u - f; the multipliers of G x >= h
    are mu = -u / r_last and z = mu[:n] - mu[n:]. The support found this way is then
    solved exactly (KKT system) in float64.
    """
    m, n = A.shape
    scale = np.linalg.norm(b)  # the problem is scale-covariant: solve it with ||b|| = 1
    b1, lam1 = b / scale, lam / scale
    G = np.vstack([-A.T, A.T])
    h = np.concatenate([A.T @ b1 - lam1, -A.T @ b1 - lam1])
    E = np.vstack([G.T, h[None]])
    f = np.zeros(m + 1)
    f[-1] = 1.0
    u, _ = scipy.optimize.nnls(E, f, maxiter=100 * n)
    r = E @ u - f
    mu = -u / r[-1]
    z_dual = (mu[:n] - mu[n:]) * scale
    support = np.flatnonzero(z_dual)
    z = np.zeros(n)
    if support.size:
        A_S = A[:, support]
        z[support] = np.linalg.solve(A_S.T @ A_S, A_S.T @ b - lam * np.sign(z_dual[support]))
    return z
