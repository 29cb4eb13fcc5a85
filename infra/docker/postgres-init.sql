-- Runs once, when the postgres volume is created: Prefect's database beside MLflow's.
CREATE DATABASE prefect OWNER mlflow;
