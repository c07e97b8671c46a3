"""Evaluation of template protection: the ISO/IEC 30136 measures (`measures`) and the attacks of an
attacker who holds codes and keys (`attacks`). Evaluation code only: nothing here is deployed."""
