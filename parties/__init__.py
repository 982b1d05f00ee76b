"""What is specific to each organisation: the OEM, the media platform and the dealer.

Table schemas, default node policies, feature preparation, nearest-store computation and
inventory views. Code here runs at its owner's node on that owner's raw data only.
"""
