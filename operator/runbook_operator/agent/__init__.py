"""What runs inside the CronJob/Job pods: backup, restore, verify. Their contract with the operator
(environment, bucket layout, plans) is ``models/plans.py``."""
