"""Streamlit helpers of the dashboard: shared selection, auth, cards, safe page bodies."""
