from orchestrator.cli import main
import sys

sys.exit(main())
