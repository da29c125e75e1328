"""Model families. Each subfolder holds exactly the files a saved checkpoint carries as remote code."""
