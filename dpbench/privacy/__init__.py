"""Privacy accounting: RDP curves, PLD and PRV, conversions to (eps, delta) and noise calibration."""

from dpbench.privacy.accounting import (ACCOUNTANTS, PrivacyReport, account, accountant_name, calibrate,
                                        check_accountant, check_accountant_name, eps_reachable)
from dpbench.privacy.rdp import SGM_ORDERS, eps_classic, eps_opacus, sgm_rdp
from dpbench.privacy.release import Release, SampledGaussian

__all__ = ["ACCOUNTANTS", "PrivacyReport", "Release", "SampledGaussian", "account", "accountant_name", "calibrate",
           "check_accountant", "check_accountant_name", "eps_reachable", "SGM_ORDERS", "eps_classic", "eps_opacus",
           "sgm_rdp"]
