"""spfpolicy: an asynchronous SPF policy server for Postfix.

One process serves every smtpd connection, evaluates SPF (RFC 7208, through
pyspf) over non-blocking DNS and shares one DNS cache across all requests.
"""

__version__ = "0.1.0"
