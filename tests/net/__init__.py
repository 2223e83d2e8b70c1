"""Network test harness: network-namespace hosts (``netns``) and a fault-injecting TCP proxy (``faultproxy``)."""
