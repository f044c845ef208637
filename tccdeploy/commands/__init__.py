"""The command line, one module per role: the TC operator's (tc), and, as they move here, the provider's, the customer's and the lab's."""
