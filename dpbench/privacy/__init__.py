"""Privacy accounting: RDP curves, conversions to (eps, delta) and noise calibration."""

from dpbench.privacy.accounting import PrivacyReport, account, calibrate
from dpbench.privacy.rdp import SGM_ORDERS, eps_classic, eps_opacus, sgm_rdp

__all__ = ["PrivacyReport", "account", "calibrate", "SGM_ORDERS", "eps_classic", "eps_opacus", "sgm_rdp"]
